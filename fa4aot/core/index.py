"""Reading a cache: the full index (for the CLI), the packed per-target index (for the runtime)
and blobs, every byte hash-checked. Writing lives in :mod:`fa4aot.compile.store`.

Layout under the cache root::

    FORMAT                      "fa4aot-cache <version>"
    index/                      diskcache (SQLite): key -> entry metadata (JSON text), every entry
    packed/<arch>-<sms>-<host>.idx
                                one file per target and host arch, rewritten at the end of every
                                build and gc: the entries the runtime may load, read in one go
    blobs/<aa>/<sha256>.<ext>   raw, immutable artifact bytes (cubin, launch plan .so, header)
    tmp/                        staging for atomic writes

Each entry stores its cubin, its launch plan (FA4's exported host code linked with the shim, for
one host CPU arch) and the header ``export_to_c`` wrote. The linked plan embeds the cubin; it is
stored with those bytes cut out and the entry records where they go back (``meta["cubin"]``:
offset, size, sha256), so the same variant built for x86_64 and aarch64 hosts shares one cubin
blob and only the plans differ. :meth:`Cache.read_plan` puts the plan back together.

The packed index::

    FA4AOT-PACKED <version>\\n
    <sha256 of the header JSON> <length of the header JSON>\\n
    <header JSON>: {"format", "target", "host_arch", "records": {variant_id: [key, offset, length, sha256]}}
    <records>: the entries' metadata JSON, back to back (offsets count from the end of the header)

Opening reads and hashes only the header; a record is read, hashed and parsed when its variant is
first used.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from fa4aot.core import env, safejson
from fa4aot.core.errors import CacheError, CorruptArtifactError
from fa4aot.core.variant import CACHE_FORMAT_VERSION, Target, Variant, sha256_hex

FORMAT_LINE = f"fa4aot-cache {CACHE_FORMAT_VERSION}"
#: File extension of each blob role.
BLOB_EXT = {"plan": "so", "header": "h", "cubin": "cubin", "selector": "py"}
DEFAULT_CACHE_ENV = env.CACHE
PACKED_DIR = "packed"
PACKED_MAGIC = b"FA4AOT-PACKED 1\n"


#: Entry-point group under which cache wheels (``fa4aot wheel``) register a function returning
#: their cache directory.
CACHE_ENTRY_POINT_GROUP = "fa4aot.caches"


def default_cache_dir() -> Path:
    """``$FA4AOT_CACHE``, else ``./cache`` (the CLI's default; the runtime also searches the
    installed cache wheels, see :func:`cache_search_path`)."""
    return Path(env.get(DEFAULT_CACHE_ENV, "cache"))


def installed_cache_wheels() -> list[tuple[str, Path]]:
    """(name, directory) of every cache wheel installed in this environment, sorted by name. A
    wheel whose entry point fails to load is skipped with a warning naming it (it cannot hold a
    usable cache, but its owner should hear that it is broken)."""
    import warnings
    from importlib.metadata import entry_points  # not imported when a cache path is given

    out = []
    for ep in sorted(entry_points(group=CACHE_ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        try:
            out.append((f"wheel {ep.name} ({ep.value})", Path(ep.load()())))
        except Exception as e:  # a broken third-party package must not stop the runtime
            warnings.warn(
                f"fa4aot: skipping the cache wheel {ep.name} ({ep.value}): its entry point fails: {e!r}"[:1000],
                RuntimeWarning,
                stacklevel=2,
            )
    return out


def cache_search_path() -> list[tuple[str, Path]]:
    """Where a runtime opened without a path looks, in order: ``$FA4AOT_CACHE`` (when set, the
    only place), else the installed cache wheels (the first one holding kernels for this GPU and
    host wins), else ``./cache``. ``fa4aot.runtime.loader.choose_cache`` picks from this list for
    both the runtime and the CLI."""
    chosen = env.get(DEFAULT_CACHE_ENV)
    if chosen:
        return [(f"${DEFAULT_CACHE_ENV}", Path(chosen))]
    return [*installed_cache_wheels(), ("./cache", Path("cache"))]


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
        """Parse an index record (bounded: :func:`fa4aot.core.safejson.loads`). A record that is not
        JSON, lacks its variant, target or blobs, or whose ``created`` is not a finite number raises
        :class:`CacheError` naming the key: every reader treats it as one damaged entry."""
        meta = safejson.loads(text, f"index record {key} is malformed", error=CacheError)
        try:
            blobs = {
                role: BlobRef(b["sha256"], int(b["size"]), BLOB_EXT.get(role, "bin"))
                for role, b in meta["blobs"].items()
            }
            entry = cls(key, Variant.from_dict(meta["variant"]), Target.from_dict(meta["target"]), meta, blobs)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CacheError(f"index record {key} is malformed: {e!r}") from None
        if "created" in meta and not is_timestamp(meta["created"]):
            # readers compare ``created`` to pick the newest entry of a variant: a string would
            # raise there, and NaN or an overflowing 1e999 (JSON allows it) would pin one forever
            raise CacheError(f"index record {key} is malformed: created {str(meta['created'])[:40]!r} is not a time")
        return entry

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


def is_timestamp(value: Any) -> bool:
    """True for what an entry's ``created`` must be: a finite number of seconds (not a bool)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))  # a huge JSON integer overflows float(): readers call it
    except OverflowError:
        return False


class PackedKey(NamedTuple):
    """What a packed index serves: a target (arch, SM count), a host arch and a plan-shim ABI. Each
    fa4aot version reads only the packed indexes of its own shim ABI, so versions can share a cache
    without loading each other's plans."""

    arch: str
    num_sms: int
    host_arch: str
    shim_abi: int

    @property
    def filename(self) -> str:
        return f"{self.arch}-{self.num_sms}-{self.host_arch}-abi{self.shim_abi}.idx"

    @classmethod
    def parse(cls, name: str) -> PackedKey | None:
        """The key of a packed index file name, or None for other files."""
        if not name.endswith(".idx"):
            return None
        parts = name[:-4].split("-")
        if len(parts) != 4 or not parts[1].isdigit() or not parts[3].startswith("abi") or not parts[3][3:].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], int(parts[3][3:]))

    def describe(self) -> str:
        return f"{self.arch} with {self.num_sms} SMs, {self.host_arch} host, shim ABI {self.shim_abi}"


def pack_index(
    target: Target,
    host_arch: str,
    records: list[tuple[str, str]],
    shim_abi: int = 0,
    selector: dict[str, Any] | None = None,
) -> bytes:
    """The packed index bytes for ``records`` ((key, metadata JSON) pairs, one per variant, all of
    plan-shim ABI ``shim_abi``); ``selector``: the blob reference (sha256, size) of FA4's selector
    module the runtime evaluates for these entries."""
    table: dict[str, list[Any]] = {}
    body = bytearray()
    for key, text in records:
        raw = text.encode()
        vid = Entry.from_json(key, raw).variant_id
        table[vid] = [key, len(body), len(raw), sha256_hex(raw)]
        body += raw
    header = json.dumps(
        {
            "format": CACHE_FORMAT_VERSION,
            "target": target.to_dict(),
            "host_arch": host_arch,
            "shim_abi": shim_abi,
            "records": table,
            "selector": selector,
        },
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
            try:
                self.target = Target.from_dict(doc["target"])
                self.host_arch: str = doc["host_arch"]
                self.shim_abi = int(doc["shim_abi"])
                self.records: dict[str, list[Any]] = dict(doc["records"])
                sel = doc.get("selector")
                self.selector: BlobRef | None = (
                    BlobRef(str(sel["sha256"]), int(sel["size"]), BLOB_EXT["selector"]) if sel else None
                )
            except (KeyError, TypeError, ValueError) as e:
                raise CorruptArtifactError(f"{path}: packed index header lacks {e}; run `fa4aot reindex`") from None
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
        newest = max(entries, key=lambda e: e.meta.get("created", 0))
        self.selector: BlobRef | None = newest.blobs.get("selector")

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
        try:
            is_cache = (self.root / "index" / "cache.db").exists() or (self.root / PACKED_DIR).is_dir()
        except OSError as e:  # e.g. an unreadable index/ directory
            raise CacheError(f"cannot read the cache {self.root}: {e.strerror or e}") from None
        if not is_cache:
            raise CacheError(f"{self.root} is not an fa4aot cache (no index); build one with `fa4aot build MANIFEST`")
        self._check_format()

    def _check_format(self) -> None:
        try:
            line = (self.root / "FORMAT").read_text().strip()
        except (OSError, UnicodeDecodeError):
            raise CacheError(f"{self.root} is not an fa4aot cache (no readable FORMAT file)") from None
        if line != FORMAT_LINE:
            raise CacheError(
                f"{self.root} has cache format {line!r}; this fa4aot reads {FORMAT_LINE!r}. "
                "Rebuild it (or build into a new directory) with this fa4aot."
            )

    # ---- full index (CLI, verify, gc) --------------------------------------------------------

    def records(self, key: str | None = None) -> Iterator[tuple[str, str]]:
        """(key, JSON) index records, committed ones only, read with plain sqlite3.

        A writer killed inside a transaction leaves a hot journal; SQLite must roll it back
        before anyone reads. With write access that happens here; without it the read fails with
        a :class:`CacheError` saying what to run (it never reads past the journal)."""
        import sqlite3  # only the CLI and the fallback path read the full index

        db = self.root / "index" / "cache.db"
        if not db.exists():
            return iter(())
        query = "SELECT key, value FROM Cache WHERE raw = 1" + (" ORDER BY rowid" if key is None else " AND key = ?")
        params = () if key is None else (key,)
        try:
            try:
                rows = self._select(f"file:{db}?mode=ro", query, params)
            except sqlite3.OperationalError as e:
                if "no such table" in str(e) and not Path(f"{db}-journal").exists():
                    # an index whose creation an older fa4aot was killed in: no entries yet (the next
                    # writer completes it; creation is atomic now)
                    return iter(())
                if not Path(f"{db}-journal").exists():
                    raise
                if not (os.access(db, os.W_OK) and os.access(db.parent, os.W_OK)):
                    raise CacheError(
                        f"the cache index {db} has an unfinished transaction (a writer was killed), and "
                        "rolling it back needs write access: run `fa4aot verify --cache "
                        f"{self.root}` once as a user who can write the cache"
                    ) from None
                self._select(str(db), "SELECT count(*) FROM sqlite_master", ())  # rolls the journal back
                rows = self._select(f"file:{db}?mode=ro", query, params)
        except sqlite3.DatabaseError as e:  # OperationalError included: locked, unreadable, corrupt
            raise CacheError(
                f"cannot read the cache index {db}: {e}. Run `fa4aot verify`; rebuild if it persists"
            ) from None
        except OSError as e:
            raise CacheError(f"cannot read the cache index {db}: {e.strerror or e}") from None
        return iter([(k, v) for k, v in rows if isinstance(k, str) and isinstance(v, str)])

    @staticmethod
    def _select(uri: str, query: str, params: tuple) -> list[tuple]:
        import sqlite3

        con = sqlite3.connect(uri, uri=uri.startswith("file:"), timeout=60)
        try:
            return con.execute(query, params).fetchall()
        finally:
            con.close()

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

    def packed_targets(self) -> list[PackedKey]:
        """The keys of every packed index present."""
        try:
            names = os.listdir(self.root / PACKED_DIR)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CacheError(f"cannot list {self.root / PACKED_DIR}: {e.strerror or e}") from None
        return sorted(k for k in map(PackedKey.parse, names) if k is not None)

    def open_packed(self, key: PackedKey) -> PackedIndex:
        return PackedIndex(self.root / PACKED_DIR / key.filename)

    # ---- blobs ---------------------------------------------------------------------------

    def blob_path(self, ref: BlobRef) -> Path:
        return self.root / "blobs" / ref.sha256[:2] / ref.filename

    def read_blob(self, entry: Entry, role: str) -> bytes:
        """The bytes of one blob, after checking size and sha256 against the entry (see
        :func:`read_regular`: links, FIFOs, devices and directories are refused)."""
        ref = entry.blobs.get(role)
        if ref is None:
            raise CacheError(f"entry {entry.key} has no {role} blob")
        what = f"{role} of entry {entry.key} ({entry.variant.label()})"

        def unreadable(path: Path, e: OSError) -> str:
            if isinstance(e, SizeMismatch):
                return (
                    f"{what} is corrupt: {path} has {e.actual} bytes, the index records {ref.size}. "
                    "Refusing to use it; run `fa4aot verify` and rebuild."
                )
            return f"{what} is missing or not a plain file: {path}: {e.strerror or e}. Rebuild it with `fa4aot build`."

        path, data = self._read_file(ref, unreadable)
        if len(data) != ref.size or sha256_hex(data) != ref.sha256:
            raise CorruptArtifactError(
                f"{what} is corrupt: {path} has {len(data)} bytes and sha256 {sha256_hex(data)[:16]}..., the index "
                f"records {ref.size} bytes and {ref.sha256[:16]}.... Refusing to use it; run `fa4aot verify` and rebuild."
            )
        return data

    def read_ref(self, ref: BlobRef, what: str) -> bytes:
        """The bytes of the blob ``ref`` names (size and sha256 checked; regular files only)."""
        path, data = self._read_file(
            ref, lambda path, e: f"{what} is missing, damaged or not a plain file: {path}: {e.strerror or e}"
        )
        if sha256_hex(data) != ref.sha256:
            raise CorruptArtifactError(f"{what} is corrupt: {path} does not match its sha256; rebuild the cache")
        return data

    def _read_file(self, ref: BlobRef, unreadable: Callable[[Path, OSError], str]) -> tuple[Path, bytes]:
        """The path of ``ref``'s blob file and its bytes, read by :func:`read_regular` (plain files of
        the recorded size only); the caller's ``unreadable`` words the CorruptArtifactError for a
        file that cannot be read so (its callers describe the blob differently)."""
        path = self.blob_path(ref)
        try:
            return path, read_regular(self.root, ("blobs", ref.sha256[:2], ref.filename), ref.size)
        except OSError as e:
            raise CorruptArtifactError(unreadable(path, e)) from None

    def read_cubin(self, entry: Entry) -> bytes:
        """The entry's cubin (its blob, hash-checked)."""
        return self.read_blob(entry, "cubin")

    def read_plan(self, entry: Entry) -> bytes:
        """The entry's loadable plan: its stored plan with the cubin put back (both blobs
        hash-checked)."""
        return splice_plan(entry, self.read_blob(entry, "plan"), self.read_cubin(entry))


def splice_plan(entry: Entry, hollow: bytes, cubin: bytes) -> bytes:
    """The linked plan from its stored form (the cubin's bytes cut out) and the cubin."""
    ref = entry.cubin
    if ref is None:
        raise CacheError(f"entry {entry.key} records no cubin location (built by an older fa4aot?)")
    if ref.size != len(cubin) or not 0 <= ref.offset <= len(hollow):
        raise CorruptArtifactError(
            f"entry {entry.key} ({entry.variant.label()}) records a cubin of {ref.size} bytes at offset "
            f"{ref.offset} of a {len(hollow)}-byte plan, but its cubin has {len(cubin)}; run `fa4aot verify` and rebuild."
        )
    return hollow[: ref.offset] + cubin + hollow[ref.offset :]


class SizeMismatch(OSError):
    """A blob file whose size is not the recorded one (``actual`` bytes)."""

    def __init__(self, actual: int):
        super().__init__(errno.EINVAL, f"{actual} bytes")
        self.actual = actual


def read_regular(root: Path, parts: tuple[str, ...], size: int) -> bytes:
    """Read ``root/parts...``, a regular file of ``size`` bytes, without following a link at any
    level below ``root``: a symlink, FIFO, device or directory raises OSError before anything is
    read (a FIFO would block, /dev/zero never end), and so does a file of another size (it is
    not read; the caller reports it as corrupt). Returns at most ``size`` bytes."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    try:
        for part in parts[:-1]:
            fds.append(os.open(part, flags | os.O_DIRECTORY, dir_fd=fds[-1]))
        fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fds[-1])
        fds.append(fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size != size:
            raise SizeMismatch(st.st_size)
        chunks, left = [], size
        while left:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        for fd in reversed(fds):
            os.close(fd)
