"""Writing a cache: atomic blob puts, the index record last, packed per-target indexes, gc.

Concurrency idiom: any number of builders may :meth:`CacheWriter.put` into one cache at once.
Each blob is written to ``tmp/``, fsynced and renamed into place (rename is atomic, and two
writers of one blob write the same bytes); the index record is written last, in one SQLite
transaction. So a reader either sees no record or a record whose blobs are all on disk - a killed
build leaves only orphan blobs, which :meth:`CacheWriter.gc` removes. The packed indexes are
regenerated from the full index under a file lock, so the last writer to take the lock has seen
every committed record.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fa4aot.core.errors import CacheError
from fa4aot.core.index import (
    BLOB_EXT,
    FORMAT_LINE,
    PACKED_DIR,
    BlobRef,
    Cache,
    Entry,
    pack_index,
    packed_name,
    parse_packed_name,
)
from fa4aot.core.variant import CACHE_FORMAT_VERSION, Target, sha256_hex


class CacheWriter(Cache):
    """A cache directory opened for writing (created if missing)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._index: Any = None
        self.root.mkdir(parents=True, exist_ok=True)
        fmt = self.root / "FORMAT"
        if fmt.exists():
            self._check_format()
        else:
            _atomic_write(self.root / "tmp", fmt, (FORMAT_LINE + "\n").encode())

    def _writer(self) -> Any:
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

    def put(self, key: str, meta: Mapping[str, Any], blobs: Mapping[str, bytes]) -> Entry:
        """Store blobs, then the index record; returns the entry. Safe to race (see module doc)."""
        self._writer()
        refs: dict[str, dict[str, Any]] = {}
        for role, data in blobs.items():
            ref = BlobRef(sha256_hex(data), len(data), BLOB_EXT.get(role, "bin"))
            path = self.blob_path(ref)
            if not blob_ok(path, ref):
                _atomic_write(self.root / "tmp", path, data)
            refs[role] = {"sha256": ref.sha256, "size": ref.size, "file": str(path.relative_to(self.root))}
        record = dict(meta)
        record["blobs"] = refs
        record.setdefault("format", CACHE_FORMAT_VERSION)
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

    # ---- packed indexes --------------------------------------------------------------------

    def write_packed(self) -> list[Path]:
        """Rewrite every target's packed index from the full index; returns the files written.

        Per (target, host arch) and variant, the newest entry of this cache format wins. Packed
        files of targets that no longer have entries are removed.
        """
        pdir = self.root / PACKED_DIR
        pdir.mkdir(exist_ok=True)
        with open(pdir / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # readers never take it; writers serialise here
            groups: dict[tuple[str, int, str], tuple[Target, dict[str, tuple[float, str, str]]]] = {}
            for key, text in self.records():
                try:
                    e = Entry.from_json(key, text)
                except CacheError:
                    continue  # `fa4aot verify` reports malformed records
                if e.meta.get("format") != CACHE_FORMAT_VERSION:
                    continue
                ident = (e.target.arch, e.target.num_sms, e.host_arch)
                target, best = groups.setdefault(ident, (e.target, {}))
                created = float(e.meta.get("created", 0))
                prev = best.get(e.variant_id)
                if prev is None or created >= prev[0]:
                    best[e.variant_id] = (created, key, text)
            written = []
            for (_, _, host), (target, best) in groups.items():
                records = [(key, text) for _, key, text in sorted(best.values(), key=lambda r: r[1])]
                path = pdir / packed_name(target, host)
                _atomic_write(self.root / "tmp", path, pack_index(target, host, records))
                written.append(path)
            for name in os.listdir(pdir):
                if parse_packed_name(name) is not None and (pdir / name) not in written:
                    (pdir / name).unlink(missing_ok=True)
            return written

    # ---- maintenance -----------------------------------------------------------------------

    def gc(self, keep: set[str] | None = None, grace_seconds: float = 3600.0) -> dict[str, int]:
        """Drop index records not in ``keep`` (if given), then blobs no record references and
        staging files, older than ``grace_seconds`` (so a concurrent build's fresh blobs stay)."""
        removed_entries = 0
        if keep is not None:
            for e in self.entries():
                if e.key not in keep and self.delete(e.key):
                    removed_entries += 1
        if removed_entries:
            self.write_packed()
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


def blob_ok(path: Path, ref: BlobRef) -> bool:
    """True if ``path`` holds exactly the bytes ``ref`` names."""
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
