"""Remote stores for cache entries, on the model of Triton's remote cache backends: a small
:class:`Store` interface - get / put / list by name - and three implementations (a local
directory, read-only HTTP(S) with the standard library, and fsspec for ``s3://``, ``gs://``,
``memory://`` and the rest, behind the ``remote`` extra).

Layout in a store (every name is content-derived)::

    blobs/<sha256>              artifact bytes, named by their hash
    entries/<key>.json          an entry's index record (the key hashes variant, toolchain, host)
    INDEX                       the entry keys, one per line (what ``list`` reads over HTTP)
    INDEX.json                  each entry key -> the sha256 of its record (what a signature covers)
    INDEX.json.sig              the pusher's ed25519 signature over INDEX.json (``push --sign``)

A pull that requires authenticity (the CLI's default) checks ``INDEX.json`` against a key the
cache trusts or a sha256 pinned out of band, then every record it downloads against its hash
there, and every blob against its record.

:func:`push` uploads what a store lacks; :func:`pull` downloads what a cache lacks, checks
every blob's sha256 and size and parses every cubin on arrival (the archive installer's checks),
then publishes through the cache writer. Nothing unverified reaches a cache.

A store is untrusted input, and a pull must end. Every read is bounded: an object larger than its
cap (:func:`object_cap`; a blob's record gives its exact size) is refused without reading past the
cap, an INDEX may list at most :data:`MAX_INDEX_KEYS` keys, records are parsed with
:func:`fa4aot.core.safejson.loads`, and only regular files are read (no FIFO, device or symlink;
for a directory or a local fsspec store, nothing else is even opened). Over HTTP every request has
a per-read timeout, every object a wall-clock deadline a server trickling bytes cannot extend, and
all transfers of one store object (one pull command) a total budget; redirects stay within the
store URL's origin. Environment:

``FA4AOT_STORE``              the default store of push / pull.
``FA4AOT_STORE_DEADLINE``     seconds all HTTP transfers of one pull may take (default 3600).
``FA4AOT_STORE_CROSS_ORIGIN`` ``1``: let an HTTP store follow redirects to another scheme, host or
                              port (a mirror or CDN); by default such a redirect is refused.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fa4aot.compile.archive import Archive, ArchiveError, _check_entry
from fa4aot.core import env, safejson
from fa4aot.core.errors import CacheError, Fa4aotError
from fa4aot.core.index import Cache, Entry
from fa4aot.core.signing import MAX_SIGNATURE_BYTES, Policy, Signer, TrustError, verify
from fa4aot.core.variant import sha256_hex

#: Environment variable naming the default store of push / pull.
STORE_ENV = env.STORE
#: Environment variable: seconds all HTTP transfers of one store object (one pull) may take.
DEADLINE_ENV = env.STORE_DEADLINE
#: Environment variable: ``1`` lets HTTP stores follow redirects to another origin.
CROSS_ORIGIN_ENV = env.STORE_CROSS_ORIGIN
INDEX_NAME = "INDEX"
SIGNED_INDEX = "INDEX.json"
SIGNED_INDEX_SIG = "INDEX.json.sig"
SIGNED_INDEX_FORMAT = "fa4aot-store-index/1"
_NAME = re.compile(r"(blobs/[0-9a-f]{64}|entries/[0-9a-f]{16,64}\.json|INDEX|INDEX\.json|INDEX\.json\.sig)")
_KEY = re.compile(r"[0-9a-f]{16,64}")

#: Largest object a store read accepts (a blob is a few MB; a record's size caps it further).
MAX_OBJECT_BYTES = 1 << 30
#: Largest entry record (one is ~2 KB; 1 MiB leaves room for any metadata growth).
MAX_RECORD_BYTES = 1 << 20
#: Most keys an INDEX may list. A full FA4 manifest is a few thousand variants per target, so this
#: allows dozens of targets x hosts x toolchains in one store, while bounding what ``store_entries``
#: fetches and holds (a hostile INDEX of 1e6 keys took 300 s and 6.9 GB before).
MAX_INDEX_KEYS = 100_000
#: Bytes per INDEX line: a key of at most 64 hex digits and its newline.
_INDEX_LINE_BYTES = 65
#: Seconds an HTTP read (connect, or one recv) may wait for the server's next bytes.
REQUEST_TIMEOUT_S = 60.0
#: Wall-clock seconds one HTTP object may take in all. Blobs are 0.1-1 MB and an INDEX at most
#: ~6.5 MB, so this passes any of them at ~20 KB/s, yet a server trickling a byte per read (each
#: read inside the timeout) cannot hold a pull for longer.
OBJECT_DEADLINE_S = 300.0
#: Default of $FA4AOT_STORE_DEADLINE: all transfers of one pull (a large cache over a slow link).
TOTAL_DEADLINE_S = 3600.0
#: Bytes read per chunk (a response is never read in one unbounded call).
_CHUNK = 1 << 16
_DEFAULT_PORTS = {"http": 80, "https": 443}


class StoreError(Fa4aotError):
    """A store is unreachable, refuses a write, or served bytes that fail verification."""


class StoreLimitError(StoreError):
    """A store exceeded a limit (an object's size, the INDEX's key count, a deadline) or tried to
    redirect elsewhere; the message names the URL and the limit."""


def max_index_bytes() -> int:
    """Largest INDEX read: :data:`MAX_INDEX_KEYS` lines of the longest key."""
    return MAX_INDEX_KEYS * _INDEX_LINE_BYTES


def object_cap(name: str, max_bytes: int | None = None) -> int:
    """The most bytes a read of store object ``name`` accepts: its kind's cap, lowered to
    ``max_bytes`` where the caller knows the size (a blob's record gives it exactly)."""
    if name == INDEX_NAME:
        cap = max_index_bytes()
    elif name == SIGNED_INDEX:
        cap = 2 * max_index_bytes() + MAX_INDEX_KEYS * 72  # key and sha256, quoted, per entry
    elif name == SIGNED_INDEX_SIG:
        cap = MAX_SIGNATURE_BYTES
    elif name.startswith("entries/"):
        cap = MAX_RECORD_BYTES
    else:
        cap = MAX_OBJECT_BYTES
    return cap if max_bytes is None else max(0, min(cap, max_bytes))


def _too_large(where: str, size: int | None, cap: int) -> StoreLimitError:
    """The error for an object over its cap; ``size`` None: not known, the read stopped at the cap."""
    got = "more" if size is None else f"{size} bytes,"
    return StoreLimitError(f"{where}: {got} more than the {cap} bytes this object may have; refused")


class Store(ABC):
    """Objects by name (see the module layout). ``get`` returns None for a missing object and
    raises :class:`StoreLimitError` for one larger than ``object_cap(name, max_bytes)``."""

    url: str
    read_only = False

    @abstractmethod
    def get(self, name: str, max_bytes: int | None = None) -> bytes | None: ...

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
        if len(keys) > MAX_INDEX_KEYS:
            raise StoreLimitError(
                f"{self.url}/{INDEX_NAME} lists {len(keys)} entries, more than the {MAX_INDEX_KEYS} a store may hold"
            )
        if not all(_KEY.fullmatch(k) for k in keys):
            raise StoreError(f"{self.url}: INDEX is malformed")
        return list(dict.fromkeys(keys))

    @staticmethod
    def check_name(name: str) -> str:
        if not _NAME.fullmatch(name):
            raise StoreError(f"refusing store object name {name!r}")
        return name


def _read_regular(root: Path, name: str, cap: int, where: str) -> bytes | None:
    """``root/name`` if it is a regular file of at most ``cap`` bytes; None if it does not exist.

    No symlink is followed below ``root`` (a link could lead out of the store, to /dev/zero or a
    FIFO), and the type is checked with lstat before anything is opened, so a FIFO is never opened
    (that would block, or wake a writer) nor a device (opening some has side effects). The open
    itself is non-blocking and rechecked with fstat, in case the file was swapped in between."""
    parts = name.split("/")
    nofollow = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    fds: list[int] = []
    try:
        fds.append(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        for part in parts[:-1]:
            fds.append(os.open(part, nofollow | os.O_DIRECTORY, dir_fd=fds[-1]))
        st = os.stat(parts[-1], dir_fd=fds[-1], follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{where}: {name} is not a regular file; refused")
        if st.st_size > cap:
            raise _too_large(f"{where}/{name}", st.st_size, cap)
        fds.append(os.open(parts[-1], nofollow | os.O_NONBLOCK, dir_fd=fds[-1]))
        if not stat.S_ISREG(os.fstat(fds[-1]).st_mode):
            raise StoreError(f"{where}: {name} is not a regular file; refused")
        data = _read_fd(fds[-1], cap + 1)  # one byte past the cap: a file that grew is refused too
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(
                f"{where}: {name} is reached through a symbolic link or a non-directory; refused"
            ) from None
        raise StoreError(f"{where}: cannot read {name}: {e.strerror or e}") from None
    finally:
        for fd in reversed(fds):
            os.close(fd)
    if len(data) > cap:
        raise _too_large(f"{where}/{name}", None, cap)
    return data


def _read_fd(fd: int, most: int) -> bytes:
    """Up to ``most`` bytes of ``fd``, in chunks."""
    chunks, left = [], most
    while left > 0:
        chunk = os.read(fd, min(left, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _is_regular(path: Path) -> bool:
    """True if ``path`` itself (not a link's target) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class LocalStore(Store):
    """A directory (possibly on NFS); writes are atomic renames. Reads take regular files only,
    without following a symlink below the store's root, up to each object's size cap."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        self.url = str(self.root)

    def get(self, name: str, max_bytes: int | None = None) -> bytes | None:
        return _read_regular(self.root, self.check_name(name), object_cap(name, max_bytes), self.url)

    def has(self, name: str) -> bool:
        return _is_regular(self.root / self.check_name(name))

    def put(self, name: str, data: bytes) -> None:
        p = self.root / self.check_name(name)
        if p.parent != self.root and p.parent.is_symlink():
            raise StoreError(f"{self.url}: {p.parent.name}/ is a symbolic link; refusing to write through it")
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


# --- HTTP ----------------------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the default port filled in."""
    p = urllib.parse.urlsplit(url)
    scheme = p.scheme.lower()
    try:
        port = p.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number: matches nothing
        port = -1
    return scheme, (p.hostname or "").lower(), port


class _Watchdog:
    """Shuts down a request's sockets at its deadline. A server trickling a byte before each read
    times out keeps every recv under the socket timeout, so only a wall-clock stop bounds the
    whole exchange (TLS handshake, status line and headers included, which the response-reading
    loop never sees). Holds a dup of each socket, so shutting one down never hits a reused fd."""

    def __init__(self, deadline: float):
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            dup = sock.dup()
            self._socks.append(dup)
            if self.expired:
                self._stop(dup)
        return sock

    @staticmethod
    def _stop(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv in the requesting thread
        except OSError:
            pass  # already closed by the other side

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                self._stop(s)

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()


class _Tracked:
    """An http.client connection whose sockets a :class:`_Watchdog` tracks from creation."""

    def __init__(self, *args: Any, watch: _Watchdog, **kw: Any):
        super().__init__(*args, **kw)
        create = self._create_connection  # http.client's own hook for making the TCP socket
        self._create_connection = lambda *a, **k: watch.track(create(*a, **k))


class _TrackedHTTP(_Tracked, http.client.HTTPConnection):
    pass


class _TrackedHTTPS(_Tracked, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watch: _Watchdog):
        super().__init__()
        self.watch = watch

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_TrackedHTTP, req, watch=self.watch)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watch: _Watchdog):
        super().__init__()
        self.watch = watch

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_TrackedHTTPS, req, watch=self.watch)  # the default TLS context


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the store's origin, unless cross-origin ones are allowed
    (never to a scheme other than http(s))."""

    def __init__(self, store_url: str, allow_cross_origin: bool):
        self.origin = _origin(store_url)
        self.allow = allow_cross_origin

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        to = _origin(newurl)
        if to[0] not in _DEFAULT_PORTS or (not self.allow and to != self.origin):
            fp.close()
            scheme, host, port = self.origin
            raise StoreLimitError(
                f"GET {req.full_url}: redirected ({code}) to {newurl}, outside the store's origin "
                f"{scheme}://{host}:{port}; refused (set ${CROSS_ORIGIN_ENV}=1 to follow redirects to other hosts)"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _env_seconds(name: str, default: float) -> float:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StoreError(f"${name}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise StoreError(f"${name}={raw!r} must be a positive number of seconds")
    return value


class HTTPStore(Store):
    """Read-only HTTP(S): ``GET <url>/<name>`` (a static file server over a pushed directory).

    Limits: ``timeout`` per read (no bytes for that long fails the request); ``object_deadline``
    wall-clock seconds per object; ``total_deadline`` seconds of transfers for this store object
    in all, i.e. one pull (default ``$FA4AOT_STORE_DEADLINE`` or :data:`TOTAL_DEADLINE_S`); each
    response read in chunks up to :func:`object_cap`. Redirects are followed only within the
    store URL's scheme, host and port unless ``allow_cross_origin`` (default: whether
    ``$FA4AOT_STORE_CROSS_ORIGIN`` is ``1``). Name resolution (DNS) is not under the deadlines.
    """

    read_only = True

    def __init__(
        self,
        url: str,
        timeout: float = REQUEST_TIMEOUT_S,
        *,
        object_deadline: float = OBJECT_DEADLINE_S,
        total_deadline: float | None = None,
        allow_cross_origin: bool | None = None,
    ):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.object_deadline = object_deadline
        self.total_deadline = _env_seconds(DEADLINE_ENV, TOTAL_DEADLINE_S) if total_deadline is None else total_deadline
        if allow_cross_origin is None:
            allow_cross_origin = env.flag(CROSS_ORIGIN_ENV)
        self.allow_cross_origin = allow_cross_origin
        #: Seconds spent in transfers so far (what ``total_deadline`` bounds).
        self.spent = 0.0

    def get(self, name: str, max_bytes: int | None = None) -> bytes | None:
        url = f"{self.url}/{self.check_name(name)}"
        left = self.total_deadline - self.spent
        if left <= 0:
            raise StoreLimitError(f"GET {url}: not started, {self._total_limit()} is spent")
        if self.object_deadline <= left:
            budget, limit = self.object_deadline, f"the {self.object_deadline:g} s deadline per object"
        else:
            budget, limit = left, self._total_limit()
        start = time.monotonic()
        try:
            return self._fetch(url, object_cap(name, max_bytes), start + budget, limit)
        finally:
            self.spent += time.monotonic() - start

    def _total_limit(self) -> str:
        return f"the {self.total_deadline:g} s budget of all transfers from this store (${DEADLINE_ENV})"

    def _fetch(self, url: str, cap: int, deadline: float, limit: str) -> bytes | None:
        """GET ``url`` by ``deadline`` (a monotonic time), at most ``cap`` bytes."""
        watch = _Watchdog(deadline)
        opener = urllib.request.build_opener(
            _HTTPHandler(watch), _HTTPSHandler(watch), _SameOriginRedirects(self.url, self.allow_cross_origin)
        )
        late = StoreLimitError(f"GET {url}: no complete response within {limit}; the server stalls or trickles")
        try:
            with opener.open(url, timeout=self.timeout) as r:
                length = r.headers.get("Content-Length", "").strip()
                if length.isdigit() and int(length) > cap:
                    raise _too_large(f"GET {url}", int(length), cap)
                data = _read_capped(r, url, cap, deadline)
        except urllib.error.HTTPError as e:
            e.close()
            if watch.expired:
                raise late from None
            if e.code == 404:
                return None
            raise StoreError(f"GET {url}: HTTP {e.code}") from None
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, bad responses
            if watch.expired:
                raise late from None
            if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                raise StoreLimitError(f"GET {url}: no bytes for {self.timeout:g} s (the per-read timeout)") from None
            raise StoreError(f"GET {url}: {e}") from None
        except _Late:
            raise late from None
        finally:
            watch.cancel()
        if watch.expired:  # a shutdown socket reads as a clean end of the response
            raise late
        return data

    def put(self, name: str, data: bytes) -> None:
        raise StoreError(f"{self.url} is a read-only HTTP store: push to the directory or bucket it serves")


class _Late(Exception):
    """The response-reading loop passed the deadline (turned into a StoreLimitError)."""


def _read_capped(r: http.client.HTTPResponse, url: str, cap: int, deadline: float) -> bytes:
    """The body of ``r`` in chunks, refusing more than ``cap`` bytes and stopping at ``deadline``.
    ``read1`` returns what one recv brought, so the deadline is checked between trickled bytes."""
    chunks: list[bytes] = []
    n = 0
    while True:
        if time.monotonic() >= deadline:
            raise _Late
        chunk = r.read1(min(_CHUNK, cap + 1 - n))
        if not chunk:
            return b"".join(chunks)
        n += len(chunk)
        if n > cap:
            raise _too_large(f"GET {url}", None, cap)
        chunks.append(chunk)


# --- fsspec --------------------------------------------------------------------------------------


class FsspecStore(Store):
    """Any fsspec filesystem (``s3://bucket/prefix``, ``gs://``, ``memory://``, ...). Reads check
    the object's type and size first (``info``), then read at most the cap; on the local
    filesystem they go through the directory store's checks (no FIFO, device or symlink opened)."""

    def __init__(self, url: str):
        try:
            import fsspec
            from fsspec.implementations.local import LocalFileSystem
        except ImportError:
            raise StoreError(
                f"{url}: fsspec is not installed (fa4aot's remote extra: pip install '.[remote]' in its checkout)"
            ) from None
        self.url = url.rstrip("/")
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url)
        except Exception as e:  # unknown protocol, missing backend package, bad credentials
            raise StoreError(f"{url}: {e}") from None
        self.local = isinstance(self.fs, LocalFileSystem)

    def _p(self, name: str) -> str:
        return f"{self.path}/{self.check_name(name)}"

    def get(self, name: str, max_bytes: int | None = None) -> bytes | None:
        path, cap = self._p(name), object_cap(name, max_bytes)
        if self.local:
            return _read_regular(Path(self.path), name, cap, self.url)
        try:
            info = self.fs.info(path)
            if info.get("type") != "file":
                raise StoreError(f"{self.url}: {name} is not a regular file ({info.get('type')}); refused")
            size = info.get("size")
            if isinstance(size, int) and size > cap:
                raise _too_large(f"{self.url}/{name}", size, cap)
            with self.fs.open(path, "rb") as f:
                data = f.read(cap + 1)  # bounded even where info has no size or was wrong
        except FileNotFoundError:
            return None
        except StoreError:
            raise
        except Exception as e:  # each backend raises its own errors
            raise StoreError(f"{self.url}: cannot read {name}: {e}") from None
        if len(data) > cap:
            raise _too_large(f"{self.url}/{name}", None, cap)
        return data

    def has(self, name: str) -> bool:
        if self.local:
            return _is_regular(Path(self._p(name)))
        return bool(self.fs.exists(self._p(name)))

    def put(self, name: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(name), data)
        except Exception as e:
            raise StoreError(f"{self.url}: cannot write {name}: {e}") from None


def open_store(url: str | None) -> Store:
    """The store ``url`` names: http(s):// -> HTTPStore, another ``scheme://`` -> fsspec, a path
    -> LocalStore. None: ``$FA4AOT_STORE``."""
    url = url or env.get(STORE_ENV)
    if not url:
        raise StoreError(f"no store given (pass one or set ${STORE_ENV})")
    if url.startswith(("http://", "https://")):
        return HTTPStore(url)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        return FsspecStore(url)
    return LocalStore(urllib.parse.urlparse(url).path if url.startswith("file://") else url)


def push(
    cache: Cache,
    store: Store,
    entries: Iterable[Entry],
    signer: Signer | None = None,
    *,
    dry_run: bool = False,
    uploads: list[tuple[str, int]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Upload the blobs and records ``store`` lacks, then its INDEX and INDEX.json (the sha256 of
    each record; signed by ``signer`` when given); (objects written, entries).

    ``dry_run``: decide the same, upload nothing. ``uploads``: gets (object name, size) of each
    blob and record uploaded (or, dry, to be). ``progress(done, total)``: after each entry."""
    if store.read_only:
        raise StoreError(f"{store.url} is read-only")
    written = 0
    keys = set(store.list_entries())
    hashes = _previous_hashes(store, keys, signer)
    entries = list(entries)
    planned: set[str] = set()  # a blob two entries share goes once, in a dry run too
    for n, e in enumerate(entries, 1):
        for role, b in e.blobs.items():
            name = f"blobs/{b.sha256}"
            if name not in planned and not store.has(name):
                planned.add(name)
                if not dry_run:
                    store.put(name, cache.read_blob(e, role))  # hash-checked on the way out
                written += 1
                if uploads is not None:
                    uploads.append((name, b.size))
        (_, text), *_ = cache.records(e.key)
        name = f"entries/{e.key}.json"
        if e.key not in keys or store.get(name) != text.encode():
            if not dry_run:
                store.put(name, text.encode())  # a differing record is replaced: the index vouches for ours
            written += 1
            if uploads is not None:
                uploads.append((name, len(text.encode())))
        keys.add(e.key)
        hashes[e.key] = sha256_hex(text.encode())
        if progress is not None:
            progress(n, len(entries))
    if dry_run:
        return written, len(entries)
    if len(keys) > MAX_INDEX_KEYS:  # pull would refuse the INDEX: say so now, not at every pull
        raise StoreLimitError(f"{store.url}: {len(keys)} entries, more than the {MAX_INDEX_KEYS} a store may hold")
    doc = json.dumps({"format": SIGNED_INDEX_FORMAT, "records": hashes}, sort_keys=True).encode()
    store.put(SIGNED_INDEX, doc)
    if signer is not None:
        store.put(SIGNED_INDEX_SIG, signer.sign(doc))
    store.put(INDEX_NAME, ("\n".join(sorted(keys)) + "\n").encode())
    return written, len(entries)


def _previous_hashes(store: Store, keys: set[str], signer: Signer | None) -> dict[str, str]:
    """The record hashes of the store's INDEX.json for keys its INDEX still lists (a push adds to
    them; entries pushed before INDEX.json existed are not vouched for until pushed again). A
    signing push keeps them only when ``signer`` signed that INDEX.json: it never vouches for
    hashes it cannot tell were its own (a store others can write)."""
    data = store.get(SIGNED_INDEX)
    if data is None:
        return {}
    if signer is not None:
        try:
            verify(data, store.get(SIGNED_INDEX_SIG) or b"", [signer.public], f"{store.url}/{SIGNED_INDEX}")
        except TrustError:
            return {}
    doc = safejson.loads(data, f"{store.url}/{SIGNED_INDEX}", max_bytes=object_cap(SIGNED_INDEX), error=StoreError)
    records = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(records, dict):
        raise StoreError(f"{store.url}/{SIGNED_INDEX} is malformed")
    return {k: v for k, v in records.items() if k in keys and isinstance(v, str)}


def authenticated_hashes(store: Store, policy: Policy) -> dict[str, str] | None:
    """Key -> record sha256 from the store's INDEX.json, once ``policy`` accepts it (a signature
    by a trusted key, or its pinned sha256); None where the policy lets an unauthenticated store
    through (``insecure``). :class:`TrustError` otherwise."""
    what = f"{store.url}/{SIGNED_INDEX}"
    data = store.get(SIGNED_INDEX)
    if data is None:
        policy.check_unsigned(f"{store.url} (it has no {SIGNED_INDEX}: pushed by an older fa4aot)")
        if policy.pinned is not None:
            raise TrustError(f"{store.url} has no {SIGNED_INDEX}, so a pinned sha256 cannot vouch for its records")
        return None
    signer = policy.check_signature(data, store.get(SIGNED_INDEX_SIG), what)
    policy.check_pinned(sha256_hex(data), what)
    if signer is None and policy.pinned is None:
        return None  # insecure: contents are still checked, authorship is not
    doc = safejson.loads(data, what, max_bytes=object_cap(SIGNED_INDEX), error=StoreError)
    records = doc.get("records") if isinstance(doc, dict) else None
    if doc.get("format") != SIGNED_INDEX_FORMAT or not isinstance(records, dict):
        raise StoreError(f"{what} is not a {SIGNED_INDEX_FORMAT} document")
    return {str(k): str(v) for k, v in records.items()}


def _record(store: Store, key: str, hashes: dict[str, str] | None = None) -> tuple[Entry, str]:
    """The entry record ``key`` of ``store``, parsed with safejson's bounds, and its text;
    ``hashes``: the authenticated record hashes it must match."""
    name = f"entries/{key}.json"
    if hashes is not None and key not in hashes:
        raise TrustError(f"{store.url}: entry {key} is not in its authenticated {SIGNED_INDEX}: refused")
    data = store.get(name)
    if data is None:
        raise StoreError(f"{store.url} lists entry {key} but does not have it")
    if hashes is not None and sha256_hex(data) != hashes[key]:
        raise TrustError(f"{store.url}/{name} does not match its hash in {SIGNED_INDEX} (tampered): refused")
    safejson.loads(data, f"{store.url}/{name}", max_bytes=MAX_RECORD_BYTES, error=StoreError)
    text = data.decode("utf-8")  # safejson decoded it already: valid UTF-8
    try:
        return Entry.from_json(key, text), text
    except CacheError as err:
        raise StoreError(f"{store.url}: {err}") from None


def fetch_entries(
    store: Store,
    keys: Iterable[str],
    *,
    host_arch: str,
    hashes: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Archive:
    """Download entries and their blobs and verify them exactly as an archive install does. Each
    blob is read up to the size its record gives, never more; ``hashes``: the authenticated
    record hashes (:func:`authenticated_hashes`) every record must match. ``progress(done,
    total)``: after each entry."""
    records: dict[str, str] = {}
    entries: list[Entry] = []
    blobs: dict[str, bytes] = {}
    keys = list(keys)
    for key in keys:
        e, text = _record(store, key, hashes)
        for role, b in e.blobs.items():
            if b.sha256 in blobs:
                continue
            got = store.get(f"blobs/{b.sha256}", max_bytes=b.size)
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
        if progress is not None:
            progress(len(entries), len(keys))
    return Archive({"source": store.url}, entries, records, blobs)


def store_entries(store: Store, hashes: dict[str, str] | None = None) -> list[Entry]:
    """Every entry record a store lists (records only, no blobs); with ``hashes``, the entries
    its authenticated index vouches for, each record checked against its hash."""
    keys = store.list_entries(required=True)
    if hashes is not None:
        keys = [k for k in keys if k in hashes]
    return [_record(store, key, hashes)[0] for key in keys]
