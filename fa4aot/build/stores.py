"""Remote stores for cache entries, on the model of Triton's remote cache backends: a small
:class:`Store` interface - get / put / list by name - and three implementations (a local
directory, read-only HTTP(S) with the standard library, and fsspec for ``s3://``, ``gs://``,
``memory://`` and the rest, behind the ``remote`` extra).

Layout in a store (every name is content-derived)::

    blobs/<sha256>              artifact bytes, named by their hash
    entries/<key>.json          an entry's index record (the key hashes variant, toolchain, host)
    INDEX                       the entry keys, one per line (what ``list`` reads over HTTP)

:func:`push` uploads what a store lacks; :func:`pull` downloads what a cache lacks, checks
every blob's sha256 and size and parses every cubin on arrival (the archive installer's checks),
then publishes through the cache writer. Nothing unverified reaches a cache.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from fa4aot.build.archive import Archive, ArchiveError, _check_entry
from fa4aot.core.errors import CacheError, Fa4aotError
from fa4aot.core.index import Cache, Entry
from fa4aot.core.variant import sha256_hex

#: Environment variable naming the default store of push / pull.
STORE_ENV = "FA4AOT_STORE"
INDEX_NAME = "INDEX"
_NAME = re.compile(r"(blobs/[0-9a-f]{64}|entries/[0-9a-f]{16,64}\.json|INDEX)")
#: Largest object a store read accepts (a blob is a few MB).
MAX_OBJECT_BYTES = 1 << 30


class StoreError(Fa4aotError):
    """A store is unreachable, refuses a write, or served bytes that fail verification."""


class Store(ABC):
    """Objects by name (see the module layout). ``get`` returns None for a missing object."""

    url: str
    read_only = False

    @abstractmethod
    def get(self, name: str) -> bytes | None: ...

    @abstractmethod
    def put(self, name: str, data: bytes) -> None: ...

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def list_entries(self, required: bool = False) -> list[str]:
        """Entry keys the store holds (from its INDEX). ``required``: a store without an INDEX
        (nothing was pushed there, or a wrong address) is an error, not an empty store."""
        data = self.get(INDEX_NAME)
        if data is None:
            if required:
                raise StoreError(f"{self.url} has no {INDEX_NAME}: nothing was pushed there (or the address is wrong)")
            return []
        keys = data.decode("ascii", "replace").split()
        if not all(re.fullmatch(r"[0-9a-f]{16,64}", k) for k in keys):
            raise StoreError(f"{self.url}: INDEX is malformed")
        return keys

    @staticmethod
    def check_name(name: str) -> str:
        if not _NAME.fullmatch(name):
            raise StoreError(f"refusing store object name {name!r}")
        return name


class LocalStore(Store):
    """A directory (possibly on NFS); writes are atomic renames."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        self.url = str(self.root)

    def get(self, name: str) -> bytes | None:
        p = self.root / self.check_name(name)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{self.url}: cannot read {name}: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            if not os.path.isfile(p) or os.fstat(f.fileno()).st_size > MAX_OBJECT_BYTES:
                raise StoreError(f"{self.url}: {name} is not a regular file of a sane size")
            return f.read()

    def has(self, name: str) -> bool:
        return (self.root / self.check_name(name)).is_file()

    def put(self, name: str, data: bytes) -> None:
        p = self.root / self.check_name(name)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except OSError as e:
            raise StoreError(f"{self.url}: cannot write {name}: {e.strerror or e}") from None


class HTTPStore(Store):
    """Read-only HTTP(S): ``GET <url>/<name>`` (a static file server over a pushed directory)."""

    read_only = True

    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def get(self, name: str) -> bytes | None:
        url = f"{self.url}/{self.check_name(name)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:  # noqa: S310 (http(s) only)
                data = r.read(MAX_OBJECT_BYTES + 1)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise StoreError(f"GET {url}: HTTP {e.code}") from None
        except OSError as e:
            raise StoreError(f"GET {url}: {e}") from None
        if len(data) > MAX_OBJECT_BYTES:
            raise StoreError(f"GET {url}: larger than {MAX_OBJECT_BYTES} bytes")
        return data

    def put(self, name: str, data: bytes) -> None:
        raise StoreError(f"{self.url} is a read-only HTTP store: push to the directory or bucket it serves")


class FsspecStore(Store):
    """Any fsspec filesystem (``s3://bucket/prefix``, ``gs://``, ``memory://``, ...)."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise StoreError(f"{url}: fsspec is not installed (pip install 'fa4aot[remote]')") from None
        self.url = url.rstrip("/")
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url)
        except Exception as e:  # unknown protocol, missing backend package, bad credentials
            raise StoreError(f"{url}: {e}") from None

    def _p(self, name: str) -> str:
        return f"{self.path}/{self.check_name(name)}"

    def get(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._p(name))
        except FileNotFoundError:
            return None
        except Exception as e:  # each backend raises its own errors
            raise StoreError(f"{self.url}: cannot read {name}: {e}") from None

    def has(self, name: str) -> bool:
        return bool(self.fs.exists(self._p(name)))

    def put(self, name: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(name), data)
        except Exception as e:
            raise StoreError(f"{self.url}: cannot write {name}: {e}") from None


def open_store(url: str | None) -> Store:
    """The store ``url`` names: http(s):// -> HTTPStore, another ``scheme://`` -> fsspec, a path
    -> LocalStore. None: ``$FA4AOT_STORE``."""
    url = url or os.environ.get(STORE_ENV)
    if not url:
        raise StoreError(f"no store given (pass one or set ${STORE_ENV})")
    if url.startswith(("http://", "https://")):
        return HTTPStore(url)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        return FsspecStore(url)
    return LocalStore(urllib.parse.urlparse(url).path if url.startswith("file://") else url)


def push(cache: Cache, store: Store, entries: Iterable[Entry]) -> tuple[int, int]:
    """Upload the blobs and records ``store`` lacks, then its INDEX; (objects written, entries)."""
    if store.read_only:
        raise StoreError(f"{store.url} is read-only")
    written = 0
    keys = set(store.list_entries())
    n = 0
    for e in entries:
        n += 1
        for role, b in e.blobs.items():
            name = f"blobs/{b.sha256}"
            if not store.has(name):
                store.put(name, cache.read_blob(e, role))  # hash-checked on the way out
                written += 1
        (_, text), *_ = cache.records(e.key)
        name = f"entries/{e.key}.json"
        if e.key not in keys or not store.has(name):
            store.put(name, text.encode())
            written += 1
        keys.add(e.key)
    store.put(INDEX_NAME, ("\n".join(sorted(keys)) + "\n").encode())
    return written, n


def fetch_entries(store: Store, keys: Iterable[str], *, host_arch: str) -> Archive:
    """Download entries and their blobs and verify them exactly as an archive install does."""
    records: dict[str, str] = {}
    entries: list[Entry] = []
    blobs: dict[str, bytes] = {}
    for key in keys:
        data = store.get(f"entries/{key}.json")
        if data is None:
            raise StoreError(f"{store.url} lists entry {key} but does not have it")
        text = data.decode("utf-8", "replace")
        try:
            e = Entry.from_json(key, text)
        except CacheError as err:
            raise StoreError(f"{store.url}: {err}") from None
        for role, b in e.blobs.items():
            if b.sha256 in blobs:
                continue
            got = store.get(f"blobs/{b.sha256}")
            if got is None:
                raise StoreError(f"{store.url}: blob {b.sha256[:12]} ({role} of {key}) is missing")
            if len(got) != b.size or sha256_hex(got) != b.sha256:
                raise StoreError(f"{store.url}: blob {b.sha256[:12]} ({role} of {key}) fails its sha256: refused")
            blobs[b.sha256] = got
        try:
            _check_entry(e, blobs, host_arch, store.url)
        except ArchiveError as err:
            raise StoreError(str(err)) from None
        entries.append(e)
        records[key] = text
    return Archive({"source": store.url}, entries, records, blobs)


def store_entries(store: Store) -> list[Entry]:
    """Every entry record a store lists (records only, no blobs)."""
    out = []
    for key in store.list_entries(required=True):
        data = store.get(f"entries/{key}.json")
        if data is None:
            raise StoreError(f"{store.url} lists entry {key} but does not have it")
        try:
            out.append(Entry.from_json(key, data))
        except CacheError as err:
            raise StoreError(f"{store.url}: {err}") from None
    return out
