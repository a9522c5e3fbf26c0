"""Hostile and damaged remote stores (issue 23): HTTP servers that trickle, serve a huge INDEX or
an oversized blob, or redirect to another host; FIFOs, /dev/zero, symlinks out of the store and
oversized objects in directory and fsspec stores; records with deep or non-finite JSON; and pulls
killed (SIGKILL) at each step of creating the destination cache's index."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, run_cli

from fa4aot.compile import stores
from fa4aot.compile.stores import FsspecStore, HTTPStore, LocalStore, StoreError, fetch_entries, store_entries
from fa4aot.core.index import Cache
from fa4aot.runtime.loader import host_arch

#: Seconds a hostile case may take with the fix; without it, these cases ran for minutes or forever.
QUICK_S = 5.0
#: Bytes a hostile server streams at a client that should stop early (it would read them all).
FLOOD_BYTES = 64 << 20
#: What a client that stops at its cap may still have pulled through the loopback's socket buffers.
FLOOD_SLACK = 16 << 20
KEY = "0123456789abcdef"
#: The documented environment variables (literal here: they are the interface under test).
DEADLINE_ENV = "FA4AOT_STORE_DEADLINE"
CROSS_ORIGIN_ENV = "FA4AOT_STORE_CROSS_ORIGIN"


# --- hostile HTTP servers ----------------------------------------------------------------------


Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path]`` (a function writing the whole response), else 404."""

    protocol_version = "HTTP/1.0"  # close-delimited bodies: no Content-Length unless a route sends one

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        route = self.server.routes.get(self.path)  # type: ignore[attr-defined]
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what the hostile cases expect

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, Route]], tuple[str, list[str]]]]:
    """``serve(routes)`` starts a server on 127.0.0.1 and returns (its URL, the paths it was asked)."""
    servers = []

    def start(routes: dict[str, Route]) -> tuple[str, list[str]]:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.routes, server.hits = routes, []  # type: ignore[attr-defined]
        threading.Thread(target=functools.partial(server.serve_forever, poll_interval=0.05), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server.hits  # type: ignore[attr-defined]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _ok(body: bytes, length: bool = True) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        if length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return route


def _trickle_body(h: http.server.BaseHTTPRequestHandler, every: float = 0.1, n: int = 1000) -> None:
    """A 200 of ``n`` bytes, one every ``every`` seconds: each read is well inside any timeout."""
    h.send_response(200)
    h.send_header("Content-Length", str(n))
    h.end_headers()
    for _ in range(n):
        h.wfile.write(b"0")
        h.wfile.flush()
        time.sleep(every)


def _trickle_headers(h: http.server.BaseHTTPRequestHandler) -> None:
    """A header line that grows by a byte every 0.1 s (http.client accepts 64 KiB of it)."""
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(1 << 16):
        h.wfile.write(b"a")
        h.wfile.flush()
        time.sleep(0.1)


def _flood(sent: list[int], declare: int | None = None) -> Route:
    """Streams FLOOD_BYTES of keys (a valid-looking INDEX) and counts what the socket took."""

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        if declare is not None:
            h.send_header("Content-Length", str(declare))
        h.end_headers()
        line = (KEY + "\n").encode() * 4096
        while sent[0] < FLOOD_BYTES:
            h.wfile.write(line)
            sent[0] += len(line)

    return route


def _redirect(to: str) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", to)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``, failing the test (not hanging it) if it has not returned after ``seconds``."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"still running after {seconds} s")
    if "error" in out:
        raise out["error"]
    return out.get("value")


# --- HTTP: deadlines ---------------------------------------------------------------------------


@pytest.mark.parametrize("route", [_trickle_body, _trickle_headers], ids=["body", "headers"])
def test_a_trickling_server_cannot_extend_the_deadline_per_object(serve, route):
    url, _ = serve({"/INDEX": route})
    store = HTTPStore(url, timeout=2.0, object_deadline=1.0)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"INDEX: no complete response within the 1 s deadline per object"):
        _within(QUICK_S, lambda: store.get("INDEX"))
    assert time.monotonic() - t0 < 2.5


def test_a_trickled_tls_handshake_hits_the_deadline():
    """An https:// store whose server sends a TLS record header, then one byte of it every 0.1 s:
    the handshake happens before any response is read, so only the watchdog can stop it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"\x16\x03\x03\x40\x00")  # a 16 KiB handshake record, announced
            while not stop.is_set():
                try:
                    conn.sendall(b"\x02")
                except OSError:
                    return
                time.sleep(0.1)

    threading.Thread(target=trickle, daemon=True).start()
    store = HTTPStore(f"https://127.0.0.1:{listener.getsockname()[1]}", timeout=2.0, object_deadline=1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(StoreError, match=r"INDEX: no complete response within the 1 s deadline per object"):
            _within(QUICK_S, lambda: store.get("INDEX"))
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - t0 < 2.5


def test_the_total_budget_spans_objects(serve):
    """Each object finishes inside its own deadline; together they exceed the pull's budget."""
    slow = functools.partial(_trickle_body, every=0.1, n=6)  # 0.6 s each
    url, _ = serve({"/INDEX": slow, f"/entries/{KEY}.json": slow})
    store = HTTPStore(url, timeout=2.0, object_deadline=10.0, total_deadline=1.0)
    assert store.get("INDEX") == b"000000"
    with pytest.raises(StoreError, match=DEADLINE_ENV):
        _within(QUICK_S, lambda: store.get(f"entries/{KEY}.json"))
    assert store.spent < 1.5


# --- HTTP: sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("declare", [None, FLOOD_BYTES], ids=["streamed", "content-length"])
def test_an_oversized_index_is_refused_without_reading_it(serve, monkeypatch, declare):
    monkeypatch.setattr(stores, "MAX_INDEX_KEYS", 1000, raising=False)  # cap: 65000 bytes
    sent = [0]
    url, _ = serve({"/INDEX": _flood(sent, declare)})
    with pytest.raises(StoreError, match=rf"GET {url}/INDEX: .*more than the 65000 bytes this object may have"):
        _within(QUICK_S, lambda: HTTPStore(url).list_entries())
    time.sleep(0.2)  # the server notices the closed connection
    assert sent[0] < FLOOD_SLACK


def test_an_index_listing_too_many_keys_is_refused(serve, monkeypatch):
    monkeypatch.setattr(stores, "MAX_INDEX_KEYS", 1000, raising=False)
    body = "".join(f"{i:016x}\n" for i in range(1001)).encode()  # 17 KB: under the byte cap
    url, _ = serve({"/INDEX": _ok(body)})
    with pytest.raises(StoreError, match=rf"{url}/INDEX lists 1001 entries, more than the 1000"):
        HTTPStore(url).list_entries()


@pytest.fixture(scope="module")
def pushed(built_cache, tmp_path_factory) -> Path:
    """A directory store holding the h100 entries of the session cache."""
    root = tmp_path_factory.mktemp("store") / "s"
    run_cli("push", str(root), "--cache", str(built_cache), "--target", "h100")
    return root


def _files(root: Path) -> dict[str, Route]:
    return {"/" + str(p.relative_to(root)): _ok(p.read_bytes()) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("declare", [False, True], ids=["streamed", "content-length"])
def test_a_blob_larger_than_its_record_says_is_refused_at_that_size(pushed, serve, declare):
    entry = store_entries(LocalStore(pushed))[0]
    ref = next(iter(entry.blobs.values()))
    routes = _files(pushed)
    sent = [0]
    routes[f"/blobs/{ref.sha256}"] = _flood(sent, FLOOD_BYTES if declare else None)
    url, _ = serve(routes)
    with pytest.raises(StoreError, match=rf"blobs/{ref.sha256}: .*more than the {ref.size} bytes this object may have"):
        _within(QUICK_S, lambda: fetch_entries(HTTPStore(url), [entry.key], host_arch=host_arch()))
    time.sleep(0.2)
    assert sent[0] < FLOOD_SLACK


# --- HTTP: redirects ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["same origin", "other origin", "other origin, allowed by env", "allowed by arg"])
def test_redirects_stay_in_the_stores_origin_unless_allowed(serve, monkeypatch, case):
    other, other_hits = serve({"/INDEX": _ok(f"{KEY}\n".encode())})
    if case == "same origin":
        url, hits = serve({"/INDEX": _redirect("/moved/INDEX"), "/moved/INDEX": _ok(f"{KEY}\n".encode())})
        assert HTTPStore(url).list_entries() == [KEY] and hits == ["/INDEX", "/moved/INDEX"]
        return
    url, _ = serve({"/INDEX": _redirect(f"{other}/INDEX")})
    if case.endswith("env"):
        monkeypatch.setenv(CROSS_ORIGIN_ENV, "1")
    store = HTTPStore(url, allow_cross_origin=True if case.endswith("arg") else None)
    if case == "other origin":
        with pytest.raises(StoreError, match=rf"redirected \(302\) to {other}/INDEX, outside .*{CROSS_ORIGIN_ENV}"):
            store.list_entries()
        assert other_hits == []  # not even asked
    else:
        assert store.list_entries() == [KEY] and other_hits == ["/INDEX"]


# --- the pull command against hostile servers ----------------------------------------------------


@pytest.mark.parametrize("case", ["trickle", "redirect"])
def test_pull_from_a_hostile_server_ends_with_a_clear_error(serve, tmp_path, case):
    other, _ = serve({"/INDEX": _ok(f"{KEY}\n".encode())})
    url, _ = serve({"/INDEX": _trickle_body if case == "trickle" else _redirect(f"{other}/INDEX")})
    env = {**os.environ, DEADLINE_ENV: "1"}
    t0 = time.monotonic()
    try:
        p = run_cli("pull", "--insecure", url, "--cache", str(tmp_path / "c"), check=False, env=env, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("pull still running after 30 s")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert (DEADLINE_ENV if case == "trickle" else CROSS_ORIGIN_ENV) in p.stderr and url in p.stderr
    assert time.monotonic() - t0 < 15 and not (tmp_path / "c").exists()


# --- records: bounded JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deep", "infinity", "oversized"])
def test_records_are_parsed_with_bounds(pushed, tmp_path, damage):
    root = tmp_path / "s"
    shutil.copytree(pushed, root)
    rec = next((root / "entries").iterdir())
    doc = json.loads(rec.read_text())
    if damage == "deep":
        rec.write_text("[" * 100_000 + "]" * 100_000)  # RecursionError for the plain json module
        match = "nested deeper"
    elif damage == "infinity":
        rec.write_text(json.dumps({**doc, "created": float("inf")}))  # writes Infinity
        match = "Infinity is not JSON"
    else:  # valid, but no record is near 1 MiB: refused by size before it is read
        rec.write_text(json.dumps({**doc, "pad": "x" * (2 << 20)}))
        match = rf"\d+ bytes, more than the {1 << 20} bytes this object may have"
    with pytest.raises(StoreError, match=rf"entries/{rec.stem}\.json: .*{match}"):
        store_entries(LocalStore(root))


# --- directory and fsspec stores: file types and sizes -----------------------------------------


def _wait_blocked_in_fifo_open(tid: list[int]) -> None:
    """Wait until thread ``tid[0]`` sleeps in the kernel's FIFO open (Linux /proc; else 0.5 s)."""
    for _ in range(200):
        try:
            if tid and Path(f"/proc/self/task/{tid[0]}/wchan").read_text() == "wait_for_partner":
                return
        except OSError:
            break
        time.sleep(0.01)
    time.sleep(0.5)


def test_a_fifo_in_a_directory_store_is_never_opened(tmp_path):
    """A writer blocked opening the FIFO would be released by any reader's open."""
    os.mkfifo(tmp_path / "INDEX")
    opened = threading.Event()
    tid: list[int] = []

    def writer() -> None:
        tid.append(threading.get_native_id())
        fd = os.open(tmp_path / "INDEX", os.O_WRONLY)  # blocks until someone opens it to read
        opened.set()
        os.close(fd)

    threading.Thread(target=writer, daemon=True).start()
    _wait_blocked_in_fifo_open(tid)
    with pytest.raises(StoreError, match="INDEX is not a regular file"):
        LocalStore(tmp_path).get("INDEX")
    assert not opened.wait(0.3)
    os.close(os.open(tmp_path / "INDEX", os.O_RDONLY | os.O_NONBLOCK))  # let the writer go


@pytest.mark.parametrize("kind", ["local", "fsspec"])
def test_a_symlinked_directory_leading_out_of_the_store_is_refused(pushed, tmp_path, kind):
    root = tmp_path / "s"
    root.mkdir()
    shutil.copy(pushed / "INDEX", root / "INDEX")
    shutil.copytree(pushed / "entries", tmp_path / "elsewhere")
    (root / "entries").symlink_to(tmp_path / "elsewhere")
    store = LocalStore(root) if kind == "local" else FsspecStore(f"local://{root}")
    with pytest.raises(StoreError, match="entries/.* is reached through a symbolic link"):
        store_entries(store)


def test_an_object_over_its_cap_in_a_directory_store_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(stores, "MAX_INDEX_KEYS", 10, raising=False)
    with open(tmp_path / "INDEX", "wb") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB that reading would never finish
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"INDEX: 1099511627776 bytes, more than the 650 bytes"):
        LocalStore(tmp_path).list_entries()
    assert time.monotonic() - t0 < 1


#: Reads one object of a local fsspec store in a fresh process with 2 GiB of address space, so that
#: a reader without the checks fails there (MemoryError, or the timeout) instead of the test host.
_FSSPEC_PROBE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from fa4aot.compile.stores import FsspecStore, StoreError
try:
    FsspecStore(sys.argv[1]).get(sys.argv[2])
except StoreError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "symlink-to-file"])
def test_a_local_fsspec_store_reads_regular_files_only(tmp_path, kind):
    store = tmp_path / "s"
    store.mkdir()
    if kind == "fifo":
        os.mkfifo(store / "INDEX")
    elif kind == "dev-zero":
        (store / "INDEX").symlink_to("/dev/zero")
    else:
        (tmp_path / "outside").write_text(KEY + "\n")
        (store / "INDEX").symlink_to(tmp_path / "outside")
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            [sys.executable, "-c", _FSSPEC_PROBE, f"local://{store}", "INDEX"],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("reading the INDEX did not return in 20 s")
    assert p.returncode == 0 and "refused:" in p.stdout and "INDEX is not a regular file" in p.stdout, p.stderr
    assert time.monotonic() - t0 < 10


def test_fsspec_reads_check_type_and_size_first(monkeypatch):
    pytest.importorskip("fsspec")
    monkeypatch.setattr(stores, "MAX_INDEX_KEYS", 10, raising=False)
    store = FsspecStore("memory://fa4aot-trust-stores")
    store.fs.pipe_file(f"{store.path}/INDEX", (KEY + "\n").encode() * 100)
    with pytest.raises(StoreError, match=r"memory://fa4aot-trust-stores/INDEX: 1700 bytes, more than the 650 bytes"):
        store.list_entries()
    store.fs.rm(f"{store.path}/INDEX")
    store.fs.mkdir(f"{store.path}/INDEX/sub")
    with pytest.raises(StoreError, match=r"INDEX is not a regular file \(directory\)"):
        store.get("INDEX")


# --- pull's index creation: kill points --------------------------------------------------------

#: Runs ``fa4aot ARGS`` and SIGKILLs itself just before the first SQLite statement starting with
#: PREFIX runs (sqlite3's trace callback fires as a statement starts): a deterministic kill point.
_KILL_AT = """
import os, signal, sqlite3, sys
prefix = sys.argv[1]
connect = sqlite3.connect
def traced(*a, **k):
    con = connect(*a, **k)
    con.set_trace_callback(lambda sql: sql.startswith(prefix) and os.kill(os.getpid(), signal.SIGKILL))
    return con
sqlite3.connect = traced
from fa4aot.tools.cli import main
main(sys.argv[2:])
"""

#: Statements diskcache runs creating an index (in order), and the first record's insert.
KILL_POINTS = [
    "PRAGMA auto_vacuum = 1",
    "CREATE TABLE IF NOT EXISTS Settings",
    "INSERT OR REPLACE INTO Settings",
    "CREATE TABLE IF NOT EXISTS Cache",
    "CREATE UNIQUE INDEX IF NOT EXISTS Cache_key_raw",
    "CREATE TRIGGER IF NOT EXISTS Settings_count_insert",
    "INSERT INTO Cache",
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_pull_killed_while_creating_the_index_leaves_a_readable_cache(pushed, built_cache, tmp_path, point):
    dst = tmp_path / "node"
    pull = ["pull", "--insecure", str(pushed), "--cache", str(dst)]
    p = subprocess.run([sys.executable, "-c", _KILL_AT, point, *pull], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    # the killed pull left no cache, or one every reader opens (nothing half-made in its place)
    if (dst / "index" / "cache.db").exists():
        assert {k for k, _ in Cache(dst).records()} <= {k for k, _ in Cache(built_cache).records()}
    # and the next pull completes it
    run_cli(*pull)
    want = {k for k, t in Cache(built_cache).records() if '"name": "h100"' in t}
    assert {k for k, _ in Cache(dst).records()} == want
    assert not list((dst / "index").glob(".create-*"))


def test_a_pull_repairs_an_index_an_older_fa4aot_left_without_its_table(pushed, built_cache, tmp_path):
    """Caches damaged before index creation was atomic (a Settings table, no Cache table) read as
    empty, and the next pull completes them."""
    import sqlite3

    dst = tmp_path / "node"
    (dst / "index").mkdir(parents=True)
    shutil.copy(built_cache / "FORMAT", dst / "FORMAT")
    con = sqlite3.connect(dst / "index" / "cache.db")
    con.execute("CREATE TABLE Settings (key TEXT NOT NULL UNIQUE, value)")
    con.commit()
    con.close()
    assert list(Cache(dst).records()) == []
    run_cli("pull", "--insecure", str(pushed), "--cache", str(dst))
    assert {k for k, _ in Cache(dst).records()} == {k for k, t in Cache(built_cache).records() if '"name": "h100"' in t}
