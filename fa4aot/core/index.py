"""The artifact cache: content-addressed blobs on disk, indexed by diskcache.

Layout under the cache root::

    FORMAT                      "fa4aot-cache <version>"
    index/                      diskcache (SQLite): key -> entry metadata (JSON text)
    blobs/<aa>/<sha256>.<ext>   raw, immutable artifact bytes (cubin, host object, header, plan)
    tmp/                        staging for atomic writes

Blobs are plain files named by their sha256, so external tools (cuobjdump, nm, a C loader) can
read them directly; ``fa4aot show KEY`` prints their paths.

Concurrency idiom: any number of builders may :meth:`Cache.put` into one cache at once. Each blob
is written to ``tmp/``, fsynced and renamed into place (rename is atomic, and two writers of one
blob write the same bytes); the index record is written last, in one SQLite transaction. So a
reader either sees no record or a record whose blobs are all on disk - a killed build leaves only
orphan blobs, which :meth:`Cache.gc` removes. Readers use :meth:`Cache.get` (never a racy
``in`` check followed by a read) and every blob read re-checks its sha256, so a flipped or
truncated file is refused, never served. Opening with ``readonly=True`` writes nothing and works
on a read-only volume.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fa4aot.core.errors import CacheError, CorruptArtifactError
from fa4aot.core.variant import CACHE_FORMAT_VERSION, Target, Variant, sha256_hex

FORMAT_LINE = f"fa4aot-cache {CACHE_FORMAT_VERSION}"
#: File extension of each blob role.
BLOB_EXT = {"cubin": "cubin", "host_object": "o", "header": "h", "plan": "so"}
DEFAULT_CACHE_ENV = "FA4AOT_CACHE"


def default_cache_dir() -> Path:
    """``$FA4AOT_CACHE``, else ``./cache``."""
    return Path(os.environ.get(DEFAULT_CACHE_ENV, "cache"))


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int
    ext: str

    @property
    def filename(self) -> str:
        return f"{self.sha256}.{self.ext}"


@dataclass(frozen=True)
class Entry:
    """One built variant: its key, variant, target, metadata and blob references."""

    key: str
    variant: Variant
    target: Target
    meta: dict[str, Any]
    blobs: dict[str, BlobRef]

    @classmethod
    def from_json(cls, key: str, text: str) -> Entry:
        try:
            meta = json.loads(text)
            blobs = {
                role: BlobRef(b["sha256"], int(b["size"]), BLOB_EXT.get(role, "bin"))
                for role, b in meta["blobs"].items()
            }
            return cls(key, Variant.from_dict(meta["variant"]), Target.from_dict(meta["target"]), meta, blobs)
        except (ValueError, KeyError, TypeError) as e:
            raise CacheError(f"index record {key} is malformed: {e}") from None

    @property
    def variant_id(self) -> str:
        return self.variant.variant_id


class Cache:
    """A cache directory. See the module docstring for layout and concurrency."""

    def __init__(self, root: str | Path, *, readonly: bool = False):
        self.root = Path(root)
        self.readonly = readonly
        self._index: Any = None
        if readonly:
            if not (self.root / "index" / "cache.db").exists():
                raise CacheError(f"{self.root} is not an fa4aot cache (no index/cache.db)")
            self._check_format()
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            fmt = self.root / "FORMAT"
            if fmt.exists():
                self._check_format()
            else:
                _atomic_write(self.root / "tmp", fmt, (FORMAT_LINE + "\n").encode())

    def _check_format(self) -> None:
        try:
            line = (self.root / "FORMAT").read_text().strip()
        except OSError:
            raise CacheError(f"{self.root} is not an fa4aot cache (no FORMAT file)") from None
        if line != FORMAT_LINE:
            raise CacheError(f"{self.root} has cache format {line!r}; this fa4aot reads {FORMAT_LINE!r}")

    # ---- index ---------------------------------------------------------------------------

    def _writer(self) -> Any:
        if self.readonly:
            raise CacheError("cache opened read-only")
        if self._index is None:
            import diskcache

            # Small JSON records stay inline in SQLite (raw text, readable by plain sqlite3);
            # a rollback journal (not WAL) lets read-only volumes open the file without -shm.
            self._index = diskcache.Cache(
                str(self.root / "index"),
                disk_min_file_size=1 << 24,
                sqlite_journal_mode="delete",
                timeout=60,
            )
        return self._index

    def records(self, key: str | None = None) -> Iterator[tuple[str, str]]:
        """(key, JSON) index records read with plain sqlite3 (works read-only)."""
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

    def put(self, key: str, meta: Mapping[str, Any], blobs: Mapping[str, bytes]) -> Entry:
        """Store blobs, then the index record; returns the entry. Safe to race (see module doc)."""
        self._writer()
        refs: dict[str, dict[str, Any]] = {}
        for role, data in blobs.items():
            ref = BlobRef(sha256_hex(data), len(data), BLOB_EXT.get(role, "bin"))
            path = self.blob_path(ref)
            if not _blob_ok(path, ref):
                _atomic_write(self.root / "tmp", path, data)
            refs[role] = {"sha256": ref.sha256, "size": ref.size, "file": str(path.relative_to(self.root))}
        record = dict(meta)
        record["blobs"] = refs
        record.setdefault("created", time.time())
        text = json.dumps(record, sort_keys=True)
        self._writer().set(key, text)
        return Entry.from_json(key, text)

    def delete(self, key: str) -> bool:
        """Remove an index record (blobs stay until :meth:`gc`)."""
        return bool(self._writer().delete(key))

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    # ---- maintenance -----------------------------------------------------------------------

    def gc(self, keep: set[str] | None = None, grace_seconds: float = 3600.0) -> dict[str, int]:
        """Drop index records not in ``keep`` (if given), then blobs no record references and
        staging files, older than ``grace_seconds`` (so a concurrent build's fresh blobs stay)."""
        removed_entries = 0
        if keep is not None:
            for e in self.entries():
                if e.key not in keep and self.delete(e.key):
                    removed_entries += 1
        referenced = {str(self.blob_path(ref)) for e in self.entries() for ref in e.blobs.values()}
        now = time.time()
        removed_blobs = freed = 0
        for sub in ("blobs", "tmp"):
            base = self.root / sub
            if not base.exists():
                continue
            for path in base.rglob("*"):
                if not path.is_file() or str(path) in referenced:
                    continue
                try:
                    st = path.stat()
                    if now - st.st_mtime < grace_seconds:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed_blobs += 1
                freed += st.st_size
        return {"entries_removed": removed_entries, "files_removed": removed_blobs, "bytes_freed": freed}


def _blob_ok(path: Path, ref: BlobRef) -> bool:
    try:
        if path.stat().st_size != ref.size:
            return False
        return sha256_hex(path.read_bytes()) == ref.sha256
    except OSError:
        return False


def _atomic_write(tmp_dir: Path, path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
