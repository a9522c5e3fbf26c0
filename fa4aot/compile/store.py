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

import contextlib
import errno
import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fa4aot.core.errors import CacheError, CacheFullError
from fa4aot.core.index import (
    BLOB_EXT,
    FORMAT_LINE,
    PACKED_DIR,
    BlobRef,
    Cache,
    Entry,
    PackedKey,
    pack_index,
    read_regular,
)
from fa4aot.core.variant import CACHE_FORMAT_VERSION, Target, sha256_hex

#: Lock file under the cache root: writers share it, gc takes it exclusively.
LOCK_FILE = "LOCK"
#: How long a writer keeps retrying while concurrent writers create the index.
INDEX_OPEN_SECONDS = 60.0
#: diskcache settings of the index: small JSON records stay inline in SQLite (raw text, readable
#: by plain sqlite3); a rollback journal (not WAL) lets read-only volumes open it without -shm.
INDEX_SETTINGS: dict[str, Any] = {"disk_min_file_size": 1 << 24, "sqlite_journal_mode": "delete", "timeout": 60}
#: Under ``index/``: the lock creators of a new index take, and the prefix of their staging dirs.
INDEX_CREATE_LOCK = ".create.lock"
INDEX_STAGING_PREFIX = ".create-"


class CacheWriter(Cache):
    """A cache directory opened for writing. ``create``: make it if it does not exist (builds);
    otherwise (gc, reindex) the directory must already be an fa4aot cache and nothing is created.
    """

    def __init__(self, root: str | Path, *, create: bool = True):
        self.root = Path(root)
        self._index: Any = None
        fmt = self.root / "FORMAT"
        if not create:
            if not fmt.is_file() or not (self.root / "index" / "cache.db").is_file():
                raise CacheError(
                    f"{self.root} is not an fa4aot cache (no FORMAT and index/cache.db); refusing to touch it"
                )
            self._check_format()
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if fmt.exists():
                self._check_format()
            else:
                _atomic_write(self.root / "tmp", fmt, (FORMAT_LINE + "\n").encode())
        except OSError as e:
            raise CacheError(f"cannot write the cache {self.root}: {e.strerror or e}") from None

    def check_writable(self) -> None:
        """Raise CacheError unless this process can write blobs and the index (checked before a
        build compiles anything)."""
        probe = self.root / "tmp" / f".probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
            self._writer()
        except (OSError, CacheError) as e:
            raise CacheError(f"the cache {self.root} is not writable: {getattr(e, 'strerror', None) or e}") from None

    @contextlib.contextmanager
    def _gc_lock(self, exclusive: bool) -> Iterator[None]:
        """Writers hold it shared from their first blob to their index record; gc holds it
        exclusively while it decides what is referenced and deletes, so it never deletes a blob a
        record is about to reference."""
        with open(self.root / LOCK_FILE, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield

    def _writer(self) -> Any:
        if self._index is None:
            import diskcache

            index = self.root / "index"
            index.mkdir(exist_ok=True)  # diskcache would make it 0755 whatever the umask
            deadline = time.monotonic() + INDEX_OPEN_SECONDS
            while True:
                try:
                    if not (index / "cache.db").exists():
                        self._create_index(index)
                    self._index = diskcache.Cache(str(index), **INDEX_SETTINGS)
                    break
                except Exception as e:  # sqlite3 errors, PermissionError, a corrupt file
                    # writers creating a new index at once: SQLite's journal-mode and schema
                    # set-up do not wait on the busy timeout, so wait here
                    if "locked" in str(e) and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    raise CacheError(f"cannot open the cache index {index}: {e}") from None
            _match_umask(index / "cache.db")
        return self._index

    @staticmethod
    def _create_index(index: Path) -> None:
        """Create ``index/cache.db`` so that it appears complete or not at all.

        diskcache creates its tables one autocommitted statement at a time, so a writer killed
        while creating the index in place left a database without the Cache table, which every
        reader (and the next pull) then failed on. The index is built in a staging directory
        beside it and hard-linked into place; creators serialise on a lock, and a link never
        replaces an index someone else (another fa4aot version, without the lock) made meanwhile.
        """
        import shutil
        import tempfile

        import diskcache

        target = index / "cache.db"
        # O_RDONLY: flock needs no write access, so a user who may only read the lock still waits
        lock = os.open(index / INDEX_CREATE_LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.exists():
                return  # another writer created it while this one waited
            for old in index.glob(f"{INDEX_STAGING_PREFIX}*"):
                shutil.rmtree(old, ignore_errors=True)  # a killed creator's: it held the lock until it died
            stage = Path(tempfile.mkdtemp(prefix=INDEX_STAGING_PREFIX, dir=index))
            try:
                diskcache.Cache(str(stage), **INDEX_SETTINGS).close()
                staged = stage / "cache.db"
                _match_umask(staged)
                with open(staged, "rb") as f:
                    os.fsync(f.fileno())  # the tables are on disk before the name is
                try:
                    os.link(staged, target)
                except FileExistsError:
                    return  # made without the lock meanwhile: theirs may hold records already
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                        raise
                    os.replace(staged, target)  # no hard links here: the lock still serialises creators
                dfd = os.open(index, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        finally:
            os.close(lock)

    def put(self, key: str, meta: Mapping[str, Any], blobs: Mapping[str, bytes]) -> Entry:
        """Store blobs, then the index record; returns the entry. Safe to race with other writers
        and with gc (see the module doc). A full disk or index raises :class:`CacheFullError`
        (nothing of this entry becomes visible)."""
        self._writer()
        refs: dict[str, dict[str, Any]] = {}
        record = dict(meta)
        record.setdefault("format", CACHE_FORMAT_VERSION)
        record.setdefault("created", time.time())
        try:
            with self._gc_lock(exclusive=False):
                for role, data in blobs.items():
                    ref = BlobRef(sha256_hex(data), len(data), BLOB_EXT.get(role, "bin"))
                    path = self.blob_path(ref)
                    if blob_ok(self.root, ref):
                        os.utime(path)  # fresh again: a gc with a grace period keeps it
                    else:
                        _atomic_write(self.root / "tmp", path, data)
                    refs[role] = {"sha256": ref.sha256, "size": ref.size, "file": str(path.relative_to(self.root))}
                record["blobs"] = refs
                text = json.dumps(record, sort_keys=True)
                self._writer().set(key, text)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFullError(f"the disk holding {self.root} is full ({e.strerror})") from None
            raise CacheError(f"cannot write to the cache {self.root}: {e.strerror or e}") from None
        except Exception as e:
            if "full" in str(e).lower():  # sqlite3: "database or disk is full"
                raise CacheFullError(f"the cache index of {self.root} cannot grow: {e}") from None
            raise
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
        """Rewrite every packed index from the full index; returns the files written.

        One file per (target, host arch, plan-shim ABI); per variant the newest entry of this cache
        format wins; records without a shim ABI or malformed ones are left out (``fa4aot verify``
        reports the latter). Packed files no entry needs any more are removed.

        Runs under the cache lock held shared (as :meth:`put` does), so a concurrent :meth:`gc`,
        which holds it exclusively, never deletes a staging file of a packed index being written.
        A cache this user cannot write raises :class:`CacheNotWritableError`; a full disk
        :class:`CacheFullError`.
        """
        try:
            with self._gc_lock(exclusive=False):
                return self._write_packed_locked()
        except OSError as e:
            raise _write_error(self.root, "rewrite the packed indexes of", e) from None

    def _write_packed_locked(self) -> list[Path]:
        """:meth:`write_packed`, for a caller holding the cache lock (shared or exclusive)."""
        pdir = self.root / PACKED_DIR
        pdir.mkdir(exist_ok=True)
        with open(pdir / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # readers never take it; writers serialise here
            groups: dict[PackedKey, tuple[Target, dict[str, tuple[float, str, str]]]] = {}
            selectors: dict[PackedKey, tuple[float, dict[str, Any]]] = {}
            for key, text in self.records():
                try:
                    e = Entry.from_json(key, text)
                    abi = int(e.meta["shim_abi"])
                except (CacheError, KeyError, TypeError, ValueError):
                    continue
                if e.meta.get("format") != CACHE_FORMAT_VERSION:
                    continue
                pk = PackedKey(e.target.arch, e.target.num_sms, e.host_arch, abi)
                target, best = groups.setdefault(pk, (e.target, {}))
                created = float(e.meta.get("created", 0))
                prev = best.get(e.variant_id)
                if prev is None or created >= prev[0]:
                    best[e.variant_id] = (created, key, text)
                sel = e.blobs.get("selector")
                if sel is not None and created >= selectors.get(pk, (-1.0, None))[0]:
                    selectors[pk] = (created, {"sha256": sel.sha256, "size": sel.size})
            written = []
            for pk, (target, best) in groups.items():
                records = [(key, text) for _, key, text in sorted(best.values(), key=lambda r: r[1])]
                path = pdir / pk.filename
                selector = selectors.get(pk, (0.0, None))[1]
                _atomic_write(self.root / "tmp", path, pack_index(target, pk.host_arch, records, pk.shim_abi, selector))
                written.append(path)
            for name in os.listdir(pdir):
                if PackedKey.parse(name) is not None and (pdir / name) not in written:
                    (pdir / name).unlink(missing_ok=True)
            return written

    # ---- maintenance -----------------------------------------------------------------------

    def gc(
        self,
        keep: set[str] | None = None,
        grace_seconds: float = 3600.0,
        owned: Callable[[Entry], bool] | None = None,
        *,
        dry_run: bool = False,
        listing: GcListing | None = None,
    ) -> dict[str, int]:
        """Drop index records not in ``keep`` (if given) among those ``owned`` accepts (default:
        all), then blobs nothing references and staging files older than ``grace_seconds``. The
        blobs of the dropped records go whatever their age: no writer can be about to reference
        them (writers hold the lock shared from their first blob to their record, and gc holds it
        exclusively), so the grace period, which protects a concurrent build's new files, does not
        apply to them. Counts in the returned dict: ``entries_removed``, ``files_removed``,
        ``bytes_freed``.

        ``dry_run``: decide exactly as above but change nothing (the packed indexes are not
        rewritten either). ``listing``: if given, gets every record dropped and every file
        removed (or, dry, to be) with its size.

        All under the exclusive cache lock, in an order a kill at any point survives: the records
        go first, then the packed indexes are rewritten without them, and only then are blobs
        deleted that neither the index nor any packed index references. So every blob a reader
        (the runtime reads the packed indexes) can reach stays on disk, and a rerun finishes the
        job. Writers stage blobs and packed indexes in ``tmp/`` holding the lock shared, so no
        staging file gc sees is being written. A cache this user cannot write raises
        :class:`CacheNotWritableError`.
        """
        import sqlite3

        try:
            with self._gc_lock(exclusive=True):
                dropped = self._drop_records(keep, owned, dry_run)
                if listing is not None:
                    listing.entries += dropped
                orphaned = {str(self.blob_path(ref)) for e in dropped for ref in e.blobs.values()}
                if dry_run:
                    kept = [e for e in self.entries() if e.key not in {d.key for d in dropped}]
                    referenced = self._referenced_dry(kept, rewrite=bool(dropped))
                else:
                    referenced = self._referenced_blobs(rewrite_packed=bool(dropped))
                removed_files, freed = self._remove_unreferenced(
                    referenced,
                    grace_seconds,
                    orphaned - referenced,
                    dry_run,
                    None if listing is None else listing.files,
                )
        except OSError as e:
            raise _write_error(self.root, "collect garbage in", e) from None
        except sqlite3.Error as e:  # diskcache's deletes: "attempt to write a readonly database"
            if "readonly" in str(e):
                raise CacheNotWritableError(f"cannot collect garbage in {self.root}: its index is read-only") from None
            raise CacheError(f"cannot collect garbage in {self.root}: {e}") from None
        return {"entries_removed": len(dropped), "files_removed": removed_files, "bytes_freed": freed}

    def _drop_records(self, keep: set[str] | None, owned: Callable[[Entry], bool] | None, dry_run: bool) -> list[Entry]:
        """Delete the index records :meth:`gc` drops (``dry_run``: only find them); the entries."""
        if keep is None:
            return []
        drop = [e for e in self.entries() if e.key not in keep and (owned is None or owned(e))]
        return drop if dry_run else [e for e in drop if self.delete(e.key)]

    def _referenced_dry(self, kept: list[Entry], rewrite: bool) -> set[str]:
        """What :meth:`_referenced_blobs` would find, changing nothing: a rewritten packed index
        references only blobs of ``kept`` entries; one left as it is, what it references."""
        referenced = {str(self.blob_path(ref)) for e in kept for ref in e.blobs.values()}
        packed = self._packed_references()
        if not rewrite and packed is not None and packed[0] <= {e.key for e in kept}:
            referenced |= packed[1]
        return referenced

    def _packed_references(self) -> tuple[set[str], set[str]] | None:
        """(keys, blob paths) the packed indexes refer to; None if one of them cannot be read."""
        keys: set[str] = set()
        paths: set[str] = set()
        try:
            for pk in self.packed_targets():
                packed = self.open_packed(pk)
                try:
                    for vid in packed.records:
                        e = packed.entry(vid)
                        keys.add(e.key)
                        paths.update(str(self.blob_path(ref)) for ref in e.blobs.values())
                    if packed.selector is not None:
                        paths.add(str(self.blob_path(packed.selector)))
                finally:
                    packed.close()
        except CacheError:
            return None
        return keys, paths

    def _referenced_blobs(self, rewrite_packed: bool) -> set[str]:
        """Paths of every blob the index or a packed index references, after rewriting the packed
        indexes if asked to or if they are stale (they name a key the index lacks: an earlier gc
        was killed before it rewrote them) or unreadable."""
        entries = self.entries()
        packed = self._packed_references()
        if rewrite_packed or packed is None or not packed[0] <= {e.key for e in entries}:
            self._write_packed_locked()
            packed = self._packed_references()
        referenced = {str(self.blob_path(ref)) for e in entries for ref in e.blobs.values()}
        return referenced | (packed[1] if packed is not None else set())

    def _remove_unreferenced(
        self,
        referenced: set[str],
        grace_seconds: float,
        orphaned: set[str] = frozenset(),  # type: ignore[assignment]
        dry_run: bool = False,
        removed_files: list[tuple[str, int]] | None = None,
    ) -> tuple[int, int]:
        """Delete the files under ``blobs/`` and ``tmp/`` not in ``referenced`` and older than
        ``grace_seconds`` (those in ``orphaned`` whatever their age); (files removed, bytes
        freed). ``dry_run``: delete nothing, count the same; ``removed_files`` gets (path, size)."""
        now = time.time()
        removed = freed = 0
        for sub in ("blobs", "tmp"):
            base = self.root / sub
            if not base.is_dir() or base.is_symlink():
                continue
            for path in base.rglob("*"):
                if str(path) in referenced or path.is_dir() and not path.is_symlink():
                    continue
                try:
                    st = path.lstat()
                    if now - st.st_mtime < grace_seconds and str(path) not in orphaned:
                        continue
                    if not dry_run:
                        path.unlink()
                except FileNotFoundError:
                    continue
                removed += 1
                freed += st.st_size
                if removed_files is not None:
                    removed_files.append((str(path), st.st_size))
        return removed, freed


@dataclass
class GcListing:
    """What a :meth:`CacheWriter.gc` removed (or, dry, would remove)."""

    #: the index records dropped
    entries: list[Entry] = field(default_factory=list)
    #: (path, size in bytes) of each file deleted
    files: list[tuple[str, int]] = field(default_factory=list)


class CacheNotWritableError(CacheError):
    """The cache is on a read-only volume, or this user may not write it (gc, reindex)."""


#: errnos of a cache this user cannot write: permissions, a read-only volume.
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
#: errnos of a full disk or quota.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _write_error(root: Path, doing: str, e: OSError) -> CacheError:
    """The typed error for ``e``, raised while trying to ``doing`` the cache at ``root``."""
    if e.errno in _NOT_WRITABLE:
        return CacheNotWritableError(
            f"cannot {doing} {root}: the cache is read-only for this user ({e.strerror}); "
            "run this as a user who can write it"
        )
    if e.errno in _FULL:
        return CacheFullError(f"cannot {doing} {root}: the disk is full ({e.strerror})")
    return CacheError(f"cannot {doing} {root}: {e.strerror or e}")


def blob_ok(root: Path, ref: BlobRef) -> bool:
    """True if the cache at ``root`` holds exactly the bytes ``ref`` names, as a regular file."""
    try:
        data = read_regular(root, ("blobs", ref.sha256[:2], ref.filename), ref.size)
    except OSError:
        return False
    return sha256_hex(data) == ref.sha256


def _match_umask(path: Path) -> None:
    """Give ``path`` the mode a new file gets under this process's umask (SQLite creates its file
    0644 whatever the umask, so a group-shared cache would lose group write on the index)."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, 0o666 & ~mask)
    except OSError:
        pass  # not our file (another user created it): leave it as it is


def _atomic_write(tmp_dir: Path, path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.replace(tmp, path)
    except IsADirectoryError:
        os.rmdir(path)  # an empty directory where a blob belongs is damage: replace it (never a full one)
        os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
