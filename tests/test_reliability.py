"""What a fault and hostile-input probe broke (issue 9), kept fixed: killed writers and hot
journals, gc racing writers, special files as blobs, typed errors, mixed fa4aot versions, group
permissions, CLI arguments, forward scalars and tensors from elsewhere."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fake_driver import FakeDriver
from helpers import HAS_DSL, run_cli

import fa4aot
from fa4aot.compile import store
from fa4aot.compile.store import CacheWriter
from fa4aot.core.errors import (
    ArgumentError,
    CacheError,
    CorruptArtifactError,
    DeviceMismatchError,
    VariantNotFoundError,
)
from fa4aot.core.index import Cache
from fa4aot.core.variant import CACHE_FORMAT_VERSION, Target, Variant, cache_key
from fa4aot.plan.abi import SHIM_ABI
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import RawTensor, _DLTensor

TARGET = Target("h100", "sm_90a", 132)


def _variant(i: int) -> Variant:
    return Variant.make("combine", "sm_90a", 132, dtype="bf16", head_dim=128, num_head=i, log_max_splits=7)


def _meta(i: int, **extra) -> dict:
    return {
        "variant": _variant(i).to_dict(),
        "target": TARGET.to_dict(),
        "toolchain": {"t": "1"},
        "host_arch": "x86_64",
        "shim_abi": SHIM_ABI,
        **extra,
    }


@pytest.fixture
def template(built_cache):
    """A real entry of the CI cache (sm_90a combine) and its blobs: clones of it are entries that
    ``fa4aot verify --no-plans`` accepts (a real cubin inside a real plan, keys that recompute)."""
    cache = Cache(built_cache)
    e = next(e for e in cache.entries() if e.variant.family == "combine" and e.target.arch == "sm_90a")
    return e, {role: cache.read_blob(e, role) for role in e.blobs}


def _clone_meta(template, i: int) -> tuple[str, dict]:
    e, _ = template
    v = Variant.make(e.variant.family, e.variant.arch, e.variant.num_sms, **dict(e.variant.fields, num_head=1000 + i))
    meta = {k: val for k, val in e.meta.items() if k != "blobs"}
    meta["variant"] = v.to_dict()
    return cache_key(v, meta["toolchain"], meta["host_arch"]), meta


def _fill(root: Path, n: int, template) -> list[str]:
    """n verify-clean clones of ``template`` (distinct variants sharing its blobs); their keys."""
    c = CacheWriter(root)
    keys = []
    for i in range(n):
        key, meta = _clone_meta(template, i)
        c.put(key, meta, template[1])
        keys.append(key)
    c.write_packed()
    c.close()
    return keys


def _committed_ok(root: Path) -> set[str]:
    """Keys of the committed entries, after checking every blob of each reads back intact."""
    cache = Cache(root)
    entries = list(cache.entries())
    for e in entries:
        for role in e.blobs:
            cache.read_blob(e, role)
    return {e.key for e in entries}


# ---- 1. readers never see uncommitted state ----------------------------------------------------

HOT_JOURNAL = r"""
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1] + "/index/cache.db", isolation_level=None)
con.execute("PRAGMA cache_size=1")  # spill: uncommitted pages reach the database file
con.execute("BEGIN IMMEDIATE")
con.execute("DELETE FROM Cache WHERE rowid > 10")
con.execute("UPDATE Cache SET value = 'garbage' WHERE rowid <= 5")
print("in transaction", flush=True)
time.sleep(60)
"""


def _leave_hot_journal(root: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", HOT_JOURNAL, str(root)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("in transaction")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (root / "index" / "cache.db-journal").exists()


def test_readers_and_gc_never_act_on_a_killed_writers_transaction(tmp_path, template):
    root = tmp_path / "c"
    keys = _fill(root, 30, template)
    _leave_hot_journal(root)
    out = run_cli("ls", "--cache", str(root))
    assert "30 entries" in out.stderr
    assert "30 ok, 0 bad" in run_cli("verify", "--cache", str(root), "--no-plans").stdout
    run_cli("gc", "--cache", str(root), "--grace", "0")
    assert _committed_ok(root) == set(keys)  # nothing committed was lost


def test_a_hot_journal_without_write_access_is_a_typed_error(tmp_path, monkeypatch, template):
    root = tmp_path / "c"
    _fill(root, 20, template)
    _leave_hot_journal(root)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as a user who cannot write the cache
    with pytest.raises(CacheError, match="unfinished transaction.*fa4aot verify"):
        list(Cache(root).records())
    monkeypatch.undo()
    assert len(list(Cache(root).records())) == 20


CRASH = r"""
import os, signal, sys
import fa4aot.compile.store as store
from fa4aot.core.variant import Target, Variant, cache_key
point, root = sys.argv[1], sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
orig = store._atomic_write
if point == "mid-blob":
    def write(tmp_dir, path, data):
        tmp_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp_dir / (path.name + ".partial.tmp"), "wb") as f:
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        die()
    store._atomic_write = write
elif point == "after-rename":
    def write(tmp_dir, path, data):
        orig(tmp_dir, path, data)
        die()
    store._atomic_write = write
c = store.CacheWriter(root)
w = c._writer()
if point == "before-index":
    type(w).set = lambda *a, **k: die()
elif point == "in-transaction":
    w._con.set_progress_handler(die, 1)
v = Variant.make("combine", "sm_90a", 132, dtype="bf16", head_dim=128, num_head=999, log_max_splits=7)
t = Target("h100", "sm_90a", 132)
c.put("victim", {"variant": v.to_dict(), "target": t.to_dict(), "toolchain": {"t": "1"}, "host_arch": "x86_64",
                 "shim_abi": int(sys.argv[3])}, {"plan": os.urandom(200000), "header": b"h" * 5000})
print("survived")
"""


@pytest.mark.parametrize("point", ["mid-blob", "after-rename", "before-index", "in-transaction"])
def test_kill_at_fixed_crash_points_leaves_only_committed_entries(tmp_path, point, template):
    root = tmp_path / "c"
    keys = set(_fill(root, 12, template))
    p = subprocess.run([sys.executable, "-c", CRASH, point, str(root), str(SHIM_ABI)], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert _committed_ok(root) == keys
    assert "12 ok, 0 bad" in run_cli("verify", "--cache", str(root), "--no-plans").stdout
    run_cli("gc", "--cache", str(root), "--grace", "0")
    assert _committed_ok(root) == keys
    assert not list((root / "tmp").glob("*.tmp"))  # gc removed what the kill left behind


RANDOM_WRITER = r"""
import os, random, sys
import fa4aot.compile.store as store
from fa4aot.core.variant import Target, Variant, cache_key
root, seed, abi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
c = store.CacheWriter(root)
t = Target("h100", "sm_90a", 132)
print("ready", flush=True)
for i in range(100000):
    n = rng.randrange(40)
    v = Variant.make("combine", "sm_90a", 132, dtype="bf16", head_dim=128, num_head=n, log_max_splits=7)
    meta = {"variant": v.to_dict(), "target": t.to_dict(), "toolchain": {"t": "1"}, "host_arch": "x86_64", "shim_abi": abi}
    if rng.random() < 0.1:
        c.gc(grace_seconds=0)
    elif rng.random() < 0.1:
        c.delete(f"r{n}")
    else:
        c.put(f"r{n}", meta, {"plan": b"%d" % n * rng.randint(1, 40000), "header": b"h%d" % (n % 5)})
"""


@pytest.mark.nightly
def test_100_random_kills_never_leave_a_broken_committed_entry(tmp_path, template):
    root = tmp_path / "c"
    base = set(_fill(root, 3, template))
    rng = random.Random(99)
    for i in range(100):
        p = subprocess.Popen(
            [sys.executable, "-c", RANDOM_WRITER, str(root), str(i), str(SHIM_ABI)], stdout=subprocess.PIPE, text=True
        )
        assert p.stdout.readline().startswith("ready")
        time.sleep(rng.uniform(0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        keys = _committed_ok(root)  # every committed entry reads back intact
        assert base <= keys


# ---- 2. gc racing writers ------------------------------------------------------------------------

WRITER = r"""
import sys
import fa4aot.compile.store as store
from fa4aot.core.variant import Target, Variant, cache_key
root, wid, rounds, abi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = store.CacheWriter(root)
t = Target("h100", "sm_90a", 132)
for r in range(rounds):
    for n in range(8):
        v = Variant.make("combine", "sm_90a", 132, dtype="bf16", head_dim=128, num_head=100 * wid + n, log_max_splits=7)
        meta = {"variant": v.to_dict(), "target": t.to_dict(), "toolchain": {"t": "1"}, "host_arch": "x86_64", "shim_abi": abi}
        # blobs shared between writers and with entries gc just orphaned: the reuse race
        c.put(f"w{wid}-{n}", meta, {"plan": b"shared-%d" % n * 5000, "header": b"h%d" % (r % 3)})
        if n % 3 == 0:
            c.delete(f"w{wid}-{n}")
"""

READER = r"""
import sys, time
from fa4aot.core.errors import CorruptArtifactError
from fa4aot.core.index import Cache
root, end = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < end:
    c = Cache(root)
    for e in c.entries():
        for role in e.blobs:
            try:
                c.read_blob(e, role)
            except CorruptArtifactError as err:
                if c.get(e.key) == e:  # still committed as read: a real break, not a later delete
                    print("broken", e.key, err)
"""

GC_LOOP = r"""
import sys, time
import fa4aot.compile.store as store
c = store.CacheWriter(sys.argv[1], create=False)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    c.gc(grace_seconds=0)
"""


@pytest.mark.slow
def test_four_writers_and_gc_grace_0_never_leave_a_broken_entry(tmp_path, template):
    root = tmp_path / "c"
    base = set(_fill(root, 2, template))
    for _ in range(3):
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(w), "4", str(SHIM_ABI)]) for w in range(4)
        ]
        gc = subprocess.Popen([sys.executable, "-c", GC_LOOP, str(root), "4"])
        reader = subprocess.Popen([sys.executable, "-c", READER, str(root), "4"], stdout=subprocess.PIPE, text=True)
        assert all(w.wait(timeout=300) == 0 for w in writers)
        assert gc.wait(timeout=300) == 0
        out, _ = reader.communicate(timeout=300)
        assert reader.returncode == 0 and "broken" not in out, out
        keys = _committed_ok(root)  # raises on any entry whose blob gc took
        assert base | {f"w{w}-{n}" for w in range(4) for n in (1, 2, 4, 5, 7)} <= keys


def test_reusing_a_blob_refreshes_it_for_gc_grace(tmp_path):
    c = CacheWriter(tmp_path)
    e = c.put("k", _meta(0), {"plan": b"plan-0", "header": b"h"})
    path = c.blob_path(e.blobs["plan"])
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    c.put("again", _meta(5), {"plan": b"plan-0", "header": b"h"})  # same bytes: reused
    assert time.time() - path.stat().st_mtime < 60


# ---- 3. gc and reindex on something that is not a cache --------------------------------------------


@pytest.mark.parametrize("command", [["gc", "--grace", "0"], ["reindex"]])
def test_gc_and_reindex_refuse_a_directory_that_is_not_a_cache(tmp_path, command):
    victim = tmp_path / "data"
    (victim / "blobs").mkdir(parents=True)
    (victim / "tmp").mkdir()
    old = victim / "blobs" / "precious"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = run_cli(*command, "--cache", str(victim), check=False)
    assert out.returncode == 1 and "not an fa4aot cache" in out.stderr
    missing = tmp_path / "nope"
    out = run_cli(*command, "--cache", str(missing), check=False)
    assert out.returncode == 1 and not missing.exists()
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# ---- 4. special files in place of blobs ------------------------------------------------------------


def _damage(kind: str, path: Path, outside: Path) -> None:
    data = path.read_bytes()
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
        except PermissionError:
            path.symlink_to("/dev/zero")  # no CAP_MKNOD here: the device through a link instead
    elif kind == "symlink-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "symlink-identical-outside":
        outside.write_bytes(data)
        path.symlink_to(outside)
    elif kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        path.write_bytes(data[:-7])
    elif kind == "flipped":
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    # "missing": left unlinked


DAMAGE = [
    "fifo",
    "device",
    "symlink-dev-zero",
    "symlink-identical-outside",
    "directory",
    "truncated",
    "flipped",
    "missing",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_matrix_is_refused_quickly_by_reader_runtime_and_verify(built_cache, tmp_path, kind):
    copy = tmp_path / "c"
    shutil.copytree(built_cache, copy)
    cache = Cache(copy)
    entry = min(
        (
            e
            for e in cache.entries()
            if e.variant.family == "combine" and e.target.arch == "sm_90a" and e.variant.fields["has_lse"]
        ),
        key=lambda e: e.variant_id,
    )
    _damage(kind, cache.blob_path(entry.blobs["plan"]), tmp_path / "outside.so")
    t0 = time.perf_counter()
    outcome: list = []

    def read():  # in a thread: a reader that blocks on a FIFO must fail the test, not hang it
        try:
            cache.read_blob(entry, "plan")
            outcome.append("read")
        except CorruptArtifactError as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    assert outcome and isinstance(outcome[0], CorruptArtifactError) and "plan of entry" in str(outcome[0]), outcome
    drv = FakeDriver()
    rt = Runtime(copy, driver=drv)
    with pytest.raises(CorruptArtifactError):
        rt.preload([entry.variant_id])
    assert drv.libraries == [] and drv.launches == []
    out = run_cli("verify", "--cache", str(copy), timeout=120, check=False)
    assert out.returncode == 1 and "1 bad" in out.stdout and entry.key[:12] in out.stderr
    assert time.perf_counter() - t0 < 60  # no hang on a FIFO, no endless /dev/zero
    # a rebuild (the same put) repairs whatever was there
    good = Cache(built_cache)
    meta = {k: v for k, v in entry.meta.items() if k != "blobs"}
    CacheWriter(copy).put(entry.key, meta, {r: good.read_blob(entry, r) for r in ("cubin", "plan", "header")})
    assert Cache(copy).read_blob(entry, "plan") == good.read_blob(entry, "plan")


# ---- 5. typed one-line errors -----------------------------------------------------------------------

SMALL = """
target: {name: h100, arch: sm_90a, num_sms: 132}
families:
  combine:
    - head_dim: [64, 128]
      num_head: [8, 16]
"""


def _fake_compile(variant, target, host_arch):
    from fa4aot.compile.worker import BuildOutput

    return BuildOutput(
        variant, True, {"plan": b"fake plan %s" % variant.variant_id.encode(), "header": b"h"}, {"shim_abi": SHIM_ABI}
    )


def _threads(target, n):
    return ThreadPoolExecutor(n)


@pytest.mark.skipif(not HAS_DSL, reason="the build computes the toolchain fingerprint from the build extra")
def test_build_checks_the_cache_is_writable_before_compiling(tmp_path):
    from fa4aot.compile.orchestrate import build

    m = tmp_path / "m.yaml"
    m.write_text(SMALL)
    root = tmp_path / "c"
    root.mkdir()
    (root / "tmp").write_text("a file where the staging directory goes")  # nothing can be staged
    compiled = []
    with pytest.raises(CacheError, match="not writable|cannot write"):
        build(m, root, 1, compile_fn=lambda v, t, h: compiled.append(v), pool_factory=_threads)
    assert compiled == []


@pytest.mark.skipif(not HAS_DSL, reason="the build computes the toolchain fingerprint from the build extra")
def test_a_full_disk_stops_the_build_cleanly_and_says_what_was_stored(tmp_path, monkeypatch):
    from fa4aot.compile.orchestrate import build

    m = tmp_path / "m.yaml"
    m.write_text(SMALL)
    writes = {"n": 0}
    orig = store._atomic_write

    def filling(tmp_dir, path, data):
        writes["n"] += 1
        if writes["n"] > 4:  # FORMAT, the first entry's two blobs, the second's plan (headers are shared)
            raise OSError(errno.ENOSPC, "No space left on device")
        orig(tmp_dir, path, data)

    monkeypatch.setattr(store, "_atomic_write", filling)
    report = build(m, tmp_path / "c", 1, compile_fn=_fake_compile, pool_factory=_threads)
    assert report.stopped and "full" in report.stopped and not report.ok
    assert report.count("built") == 2 and report.count("failed") == 2
    monkeypatch.undo()
    assert len(_committed_ok(tmp_path / "c")) == 2  # what was stored is intact


def test_corrupt_or_unreadable_index_is_a_one_line_error(tmp_path, monkeypatch, template):
    root = tmp_path / "c"
    keys = _fill(root, 3, template)
    (root / "index" / "cache.db").write_bytes(b"this is not a database" * 100)
    for cmd in (["ls"], ["verify"], ["show", keys[0][:8]]):
        out = run_cli(*cmd, "--cache", str(root), check=False)
        assert out.returncode == 1 and "Traceback" not in out.stderr and "cache index" in out.stderr, out.stderr
    assert len(Runtime(root, driver=FakeDriver()).index) == 3  # the runtime reads the packed index
    shutil.rmtree(root / "packed")
    with pytest.raises(CacheError, match="cannot read the cache index"):
        Runtime(root, driver=FakeDriver())

    real_exists = Path.exists

    def unreadable(self):  # index/ without read or search permission (root ignores chmod here)
        if self.name == "cache.db":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_exists(self)

    monkeypatch.setattr(Path, "exists", unreadable)
    with pytest.raises(CacheError, match="Permission denied"):
        Cache(root)
    monkeypatch.undo()

    def denied(*a, **k):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", denied)
    with pytest.raises(CacheError, match="unable to open"):
        list(Cache(root).records())


def test_one_malformed_record_fails_only_itself(tmp_path, template):
    root = tmp_path / "c"
    _fill(root, 3, template)
    c = CacheWriter(root)
    c._writer().set("broken", json.dumps({"variant": {}}))
    bad = _meta(7)
    bad["blobs"] = {"plan": {"sha256": "0" * 64, "size": 1}}
    bad["format"] = CACHE_FORMAT_VERSION  # what put() adds
    c._writer().set("no-kernels", json.dumps(bad))
    c.write_packed()
    c.close()
    drv = FakeDriver()
    rt = Runtime(root, driver=drv)
    with pytest.raises(CacheError, match="malformed"):
        rt.preload([_variant(7).variant_id])
    out = run_cli("verify", "--cache", str(root), "--no-plans", check=False)
    assert out.returncode == 1 and "broken" in out.stderr and "no-kernels"[:12] in out.stderr
    shutil.rmtree(root / "packed")
    with pytest.warns(RuntimeWarning, match="skipped 1 malformed"):
        rt = Runtime(root, driver=drv)
    assert len(rt.index) == 4


# ---- 6. two fa4aot versions on one cache --------------------------------------------------------------


@pytest.mark.skipif(not HAS_DSL, reason="gc --manifest computes this installation's toolchain fingerprint")
def test_mixed_versions_never_load_each_others_plans_and_gc_keeps_the_other(built_cache, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(built_cache, copy)
    w = CacheWriter(copy)
    mine = [e for e in w.entries() if e.target.arch == "sm_90a"]
    other = dict(mine[0].meta, shim_abi=SHIM_ABI + 1, toolchain={"fa4aot": "a later one"}, created=time.time() + 10)
    other.pop("blobs")
    w.put("other-version", other, {"plan": b"plan of another shim ABI", "header": b"h"})
    w.write_packed()
    names = sorted(p.name for p in (copy / "packed").glob("*.idx"))
    assert any(f"abi{SHIM_ABI + 1}" in n for n in names) and any(f"abi{SHIM_ABI}.idx" in n for n in names)
    rt = Runtime(copy, driver=FakeDriver())
    assert rt.index.entry(mine[0].variant_id).key == mine[0].key  # not the newer, other-ABI build
    rt.preload("all")
    # gc --manifest of this installation keeps the other version's entry ...
    run_cli("gc", "--cache", str(copy), "--manifest", str(Path(__file__).parent.parent / "manifests" / "ci.yaml"))
    assert Cache(copy).get("other-version") is not None
    # ... unless told otherwise
    run_cli(
        "gc",
        "--cache",
        str(copy),
        "--manifest",
        str(Path(__file__).parent.parent / "manifests" / "ci.yaml"),
        "--other-toolchains",
    )
    assert Cache(copy).get("other-version") is None
    # a cache holding only another version's plans says so
    only_other = tmp_path / "o"
    w = CacheWriter(only_other)
    w.put("x", other, {"plan": b"p", "header": b"h"})
    w.write_packed()
    with pytest.raises(DeviceMismatchError, match="another fa4aot version"):
        Runtime(only_other, driver=FakeDriver())


# ---- 8. group permissions ---------------------------------------------------------------------------------

UMASK = r"""
import os, sys
os.umask(0o002)
import fa4aot.compile.store as store
from fa4aot.core.variant import Target, Variant, cache_key
c = store.CacheWriter(sys.argv[1])
t = Target("h100", "sm_90a", 132)
v = Variant.make("combine", "sm_90a", 132, head_dim=64)
c.put("k", {"variant": v.to_dict(), "target": t.to_dict(), "toolchain": {}, "host_arch": "x86_64", "shim_abi": 3},
      {"plan": b"p", "header": b"h"})
c.write_packed()
c.close()
"""


def test_umask_002_gives_a_group_writable_cache_throughout(tmp_path):
    root = tmp_path / "c"
    subprocess.run([sys.executable, "-c", UMASK, str(root)], check=True)
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}
    assert modes["index/cache.db"] == 0o664
    for name, mode in modes.items():
        want = 0o775 if (root / name).is_dir() else 0o664
        assert mode == want, (name, oct(mode))


# ---- 9. CLI arguments -------------------------------------------------------------------------------------


def test_cli_arguments_are_checked(built_cache, tmp_path):
    e = next(e for e in Cache(built_cache).entries() if e.variant.family == "fwd_sm90")
    for shape, msg in (
        ("batch=-5", "batch must be in 1.."),
        ("batch=0", "batch must be in 1.."),
        ("bogus=1", "unknown size 'bogus'"),
        ("batch=x", "expected batch=<integer>"),
    ):
        out = run_cli("launch-plan", e.key[:10], "--cache", str(built_cache), "--shape", shape, check=False)
        assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr, out.stderr
    m = tmp_path / "m.yaml"
    m.write_text(SMALL)
    out = run_cli("build", str(m), "--cache", str(tmp_path / "c"), "--family", "nope", check=False)
    assert out.returncode == 1 and "unknown family 'nope'" in out.stderr
    out = run_cli("build", str(m), "--cache", str(tmp_path / "c"), "--family", "prepare", check=False)
    assert out.returncode == 1 and "builds no prepare variant" in out.stderr
    for grace in ("-5", "nan", "inf"):
        out = run_cli("gc", "--cache", str(built_cache), "--grace", grace, check=False)
        assert out.returncode == 2 and "--grace" in out.stderr, out.stderr


# ---- 10 and 11. forward scalars, tensors on other devices, read-only buffers ------------------------------


def _raw(i, shape, dtype="bf16", device=0):
    return RawTensor(0x7F50_0000_0000 + i * (1 << 36), shape, dtype, None, device)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(softmax_scale=float("nan")), "softmax_scale: must be finite"),
        (dict(softmax_scale=float("inf")), "softmax_scale: must be finite"),
        (dict(softmax_scale=True), "softmax_scale: expected a number"),
        (dict(softmax_scale="0.1"), "softmax_scale: expected a number"),
        (dict(window_size=(1.5, 0)), "window_size left: expected an int"),
        (dict(window_size=(2**40, 0)), "does not fit"),
        (dict(num_splits=2.0), "num_splits: expected an int"),
    ],
)
def test_bad_forward_scalars_are_typed_errors_before_launch(built_cache, kw, match):
    drv = FakeDriver()
    rt = Runtime(built_cache, driver=drv)
    q = _raw(0, (1, 64, 8, 128))
    with pytest.raises(ArgumentError, match=match):
        fa4aot.flash_attn_func(q, q, q, out=_raw(1, (1, 64, 8, 128)), runtime=rt, **kw)
    assert drv.launches == []


class _CAI:
    """A __cuda_array_interface__ tensor (no device in it, like Numba's and CuPy's)."""

    def __init__(self, ptr, shape, typestr="<f2"):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape, "typestr": typestr, "version": 3}


def test_cuda_array_interface_tensors_on_another_device_are_refused(built_cache):
    drv = FakeDriver(num_devices=2)  # with one device, no buffer could be on cuda:1
    rt = Runtime(built_cache, driver=drv)
    q, k, v, o = (_CAI(0x7F60_0000_0000 + i * (1 << 36), (1, 64, 8, 128)) for i in range(4))
    drv.pointer_devices[q.__cuda_array_interface__["data"][0]] = 1
    with pytest.raises(ArgumentError, match="q: is on cuda:1"):
        fa4aot.flash_attn_func(q, k, v, out=o, runtime=rt)
    drv.pointer_devices[q.__cuda_array_interface__["data"][0]] = None
    with pytest.raises(ArgumentError, match="not CUDA device memory"):
        fa4aot.flash_attn_func(q, k, v, out=o, runtime=rt)
    drv.pointer_devices.clear()
    with pytest.raises(VariantNotFoundError):  # checks passed; ci.yaml builds no fp16 SM90 forward
        fa4aot.flash_attn_func(q, k, v, out=o, runtime=rt)
    assert drv.launches == []


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    """DLPack 1.0's DLManagedTensorVersioned, laid out here apart from fa4aot's offsets."""

    _fields_ = [
        ("version", _DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


class _DLPackVersioned:
    """A DLPack 1.0 producer: bf16 CUDA tensor, optionally marked read-only."""

    def __init__(self, ptr, shape, read_only):
        n = len(shape)
        self._shape = (ctypes.c_int64 * n)(*shape)
        st = [1] * n
        for i in range(n - 2, -1, -1):
            st[i] = st[i + 1] * shape[i + 1]
        self._strides = (ctypes.c_int64 * n)(*st)
        m = self._m = _DLManagedTensorVersioned()
        m.version.major, m.flags = 1, 1 if read_only else 0
        t = m.dl_tensor
        t.data, t.ndim, t.shape, t.strides = ptr, n, self._shape, self._strides
        t.device.device_type, t.device.device_id = 2, 0
        t.dtype.code, t.dtype.bits, t.dtype.lanes = 4, 16, 1

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, max_version=None):
        if max_version is None:
            raise TypeError("this producer exports DLPack 1.0 only")
        new = ctypes.pythonapi.PyCapsule_New
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self._m), b"dltensor_versioned", None)


def test_read_only_dlpack_buffers_are_never_written(built_cache):
    drv = FakeDriver()
    rt = Runtime(built_cache, driver=drv)
    shape = (1, 64, 8, 128)
    q, k, v = (_DLPackVersioned(0x7F70_0000_0000 + i * (1 << 36), shape, read_only=True) for i in range(3))
    ro_out = _DLPackVersioned(0x7F70_0000_0000 + (3 << 36), shape, read_only=True)
    with pytest.raises(ArgumentError, match="out: the tensor is read-only"):
        fa4aot.flash_attn_func(q, k, v, out=ro_out, runtime=rt)
    with pytest.raises(ArgumentError, match="read-only"):
        fa4aot.prepare_forward(q, k, v, ro_out, runtime=rt)
    assert drv.launches == []
    out = _DLPackVersioned(0x7F70_0000_0000 + (4 << 36), shape, read_only=False)
    fa4aot.flash_attn_func(q, k, v, out=out, runtime=rt)  # read-only inputs are fine
    assert len(drv.launches) == 1


def test_raw_pointers_are_located_once_per_allocation_range(built_cache):
    """In a one-device process the driver is asked about each allocation range once, not about
    each raw-pointer tensor on each call; with more devices it is asked every time (an address
    freed on one device may come back on another)."""
    from fa4aot.runtime.validate import MAX_POINTER_RANGES

    for devices, per_call in ((1, 0), (2, 3)):  # q, k, v (out is checked after the lookup that fails here)
        drv = FakeDriver(num_devices=devices)
        rt = Runtime(built_cache, driver=drv)
        q, k, v, o = (_CAI(0x7F60_0000_0000 + i * (1 << 36), (1, 64, 8, 128)) for i in range(4))
        for _ in range(2):
            with pytest.raises(VariantNotFoundError):  # checked, located; ci.yaml builds no fp16 SM90 forward
                fa4aot.flash_attn_func(q, k, v, out=o, runtime=rt)
        first = drv.pointer_queries
        with pytest.raises(VariantNotFoundError):
            fa4aot.flash_attn_func(q, k, v, out=o, runtime=rt)
        assert drv.pointer_queries - first == per_call
    # an address inside a remembered range is on the range's device without a query; a range not
    # seen yet is asked about; a full table starts over
    from fa4aot.runtime.validate import PointerRanges

    drv = FakeDriver()
    ranges = PointerRanges(drv)
    assert ranges.device(0x7F60_0000_1000) == 0 and drv.pointer_queries == 1
    assert ranges.device(0x7F60_0000_FFF0) == 0 and drv.pointer_queries == 1
    assert ranges.device(0x7F60_0001_0000) == 0 and drv.pointer_queries == 2
    drv.pointer_devices[0x7F70_0000_0000] = None
    assert ranges.device(0x7F70_0000_0000) is None and drv.pointer_queries == 3
    for i in range(MAX_POINTER_RANGES + 1):
        ranges.device(0x7000_0000_0000 + i * 0x10000)
    assert len(ranges._starts) <= MAX_POINTER_RANGES
