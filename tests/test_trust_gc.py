"""Cache maintenance that a kill, a concurrent writer, a read-only volume or a full disk cannot
turn into a broken cache or a traceback (issue 23): `gc` killed at every step, `gc --grace 0`
racing a packed-index writer, `gc` / `reindex` of a read-only cache, `wheel` on a full disk."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from helpers import run_cli

from fa4aot.compile import store
from fa4aot.compile.store import CacheWriter
from fa4aot.core.index import BlobRef, Cache
from fa4aot.core.variant import Target, Variant, cache_key
from fa4aot.plan.abi import SHIM_ABI

#: Two targets, so that a gc dropping every entry of one also removes its packed index.
TARGETS = (Target("h100", "sm_90a", 132), Target("b200", "sm_100a", 148))
#: Entries per target; gc keeps the first of the first target's.
PER_TARGET = 2
#: More kill points than any gc of this cache has (a run that survives ends the loop first).
MAX_STEPS = 60
#: How long a packed-index writer waits, staged, before its rename (gc runs meanwhile).
STAGED_SECONDS = 2.0
#: The unprivileged user a root test process runs the read-only cases as.
NOBODY = 65534
#: A tmpfs too small for any cache wheel (bytes).
TINY_TMPFS = 64 * 1024


def _fill(root: Path) -> list[str]:
    """A cache of PER_TARGET entries per target, each with blobs of its own, and its packed
    indexes; the keys, in order."""
    c = CacheWriter(root)
    keys = []
    for t in TARGETS:
        for i in range(PER_TARGET):
            v = Variant.make("combine", t.arch, t.num_sms, dtype="bf16", head_dim=128, num_head=i + 1, log_max_splits=7)
            meta = {
                "variant": v.to_dict(),
                "target": t.to_dict(),
                "toolchain": {"t": "1"},
                "host_arch": "x86_64",
                "shim_abi": SHIM_ABI,
            }
            key = cache_key(v, meta["toolchain"], meta["host_arch"])
            c.put(key, meta, {"plan": key.encode() * 500, "header": f"// {key}".encode()})
            keys.append(key)
    c.write_packed()
    c.close()
    return keys


def _reachable_but_broken(root: Path) -> list[str]:
    """Blobs a reader can reach - through the full index (CLI, verify) or a packed index (the
    runtime) - that are not on disk intact."""
    cache = Cache(root)
    broken = []

    def check(where: str, ref: BlobRef) -> None:
        if not store.blob_ok(root, ref):
            broken.append(f"{where}: {ref.filename}")

    for e in cache.entries():
        for ref in e.blobs.values():
            check(f"index {e.key[:12]}", ref)
    for pk in cache.packed_targets():
        packed = cache.open_packed(pk)
        for vid in packed.records:
            for ref in packed.entry(vid).blobs.values():
                check(f"{pk.filename} {vid[:12]}", ref)
        if packed.selector is not None:
            check(f"{pk.filename} selector", packed.selector)
        packed.close()
    return broken


def _packed_keys(root: Path) -> set[str]:
    cache = Cache(root)
    keys = set()
    for pk in cache.packed_targets():
        packed = cache.open_packed(pk)
        keys |= {packed.records[vid][0] for vid in packed.records}
        packed.close()
    return keys


#: gc in a process that SIGKILLs itself at its Nth step: an index record deleted, a file (blob or
#: packed index) written or a file unlinked. Prints the number of steps if it survives.
KILLED_GC = textwrap.dedent(
    """
    import os, signal, sys
    import fa4aot.compile.store as store
    root, kill_at, keep = sys.argv[1], int(sys.argv[2]), set(sys.argv[3].split(","))
    steps = [0]
    def counted(fn):
        def step(*a, **k):
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return step
    os.unlink = counted(os.unlink)
    store._atomic_write = counted(store._atomic_write)
    store.CacheWriter.delete = counted(store.CacheWriter.delete)
    store.CacheWriter(root, create=False).gc(keep, grace_seconds=0)
    print("steps", steps[0])
    """
)


def test_gc_killed_at_any_step_leaves_every_reachable_blob_on_disk(tmp_path):
    """gc used to delete blobs before rewriting the packed indexes (after it released the lock):
    a gc --manifest killed in between left the runtime pointing at deleted blobs."""
    template = tmp_path / "template"
    keys = _fill(template)
    keep = {keys[0]}
    broken: dict[int, list[str]] = {}
    killed: list[Path] = []
    for kill_at in range(1, MAX_STEPS):
        root = tmp_path / f"killed-at-{kill_at}"
        shutil.copytree(template, root)
        p = subprocess.run(
            [sys.executable, "-c", KILLED_GC, str(root), str(kill_at), ",".join(keep)], capture_output=True, text=True
        )
        if p.returncode == 0:
            assert kill_at > 1 and f"steps {kill_at - 1}" in p.stdout, p.stdout
            break
        assert p.returncode == -signal.SIGKILL, p.stderr
        broken[kill_at] = _reachable_but_broken(root)
        killed.append(root)
    else:
        raise AssertionError(f"gc took more than {MAX_STEPS} steps")
    assert {k: b for k, b in broken.items() if b} == {}, "killed at these steps, gc left references to deleted blobs"
    for root in killed:  # a gc run to the end after the kill finishes the job
        CacheWriter(root, create=False).gc(keep, grace_seconds=0)
        assert {e.key for e in Cache(root).entries()} == keep == _packed_keys(root), root.name
        assert _reachable_but_broken(root) == []
        kept = {Cache(root).blob_path(ref).name for e in Cache(root).entries() for ref in e.blobs.values()}
        assert {f.name for f in (root / "blobs").rglob("*") if f.is_file()} == kept, root.name


#: write_packed, paused between writing its staging file in tmp/ and renaming it into place.
STAGED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import fa4aot.compile.store as store
    real_replace = os.replace
    def paused_replace(src, dst, *a, **k):
        if str(dst).endswith(".idx"):
            print("staged", flush=True)
            time.sleep(float(sys.argv[2]))  # gc --grace 0 runs now
        return real_replace(src, dst, *a, **k)
    os.replace = paused_replace
    store.CacheWriter(sys.argv[1], create=False).write_packed()
    print("written", flush=True)
    """
)


@pytest.mark.slow
def test_gc_grace_0_never_deletes_a_packed_index_being_staged(tmp_path):
    """gc --grace 0 used to delete a writer's packed-index staging file (FileNotFoundError)."""
    root = tmp_path / "c"
    keys = _fill(root)
    writer = subprocess.Popen(
        [sys.executable, "-c", STAGED_WRITER, str(root), str(STAGED_SECONDS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().startswith("staged")
        gc = run_cli("gc", "--cache", str(root), "--grace", "0", check=False, timeout=120)
        out, err = writer.communicate(timeout=120)
    finally:
        writer.kill()
        writer.wait()
    assert gc.returncode == 0, gc.stderr
    assert writer.returncode == 0 and "written" in out, err
    assert _packed_keys(root) == set(keys) and _reachable_but_broken(root) == []


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_mtime_ns, p.lstat().st_size) for p in root.rglob("*")}


def _read_only_prefix(mode: str, root: Path) -> list[str]:
    """The command prefix that runs the CLI on ``root`` as it is read-only: ``eacces`` a user
    without write permission, ``erofs`` a read-only bind mount. Skips where it cannot be done."""
    if mode == "eacces":
        if os.geteuid() != 0:
            for p in [root, *root.rglob("*")]:
                p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            return []
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no user to be that cannot write")
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, str(root)]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only bind mount here (unshare -m)")
    return prefix


@pytest.fixture
def shared_tmp():
    """A temporary directory every user may enter (pytest's own is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="fa4aot-trust-gc-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:  # writable again (the eacces case took write permission away)
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(d)


@pytest.mark.parametrize("command", [["gc", "--grace", "0"], ["reindex"]], ids=["gc", "reindex"])
@pytest.mark.parametrize("mode", ["eacces", "erofs"])
def test_gc_and_reindex_of_a_read_only_cache_are_a_one_line_error(shared_tmp, command, mode):
    """Both used to end in a PermissionError / OSError traceback."""
    root = shared_tmp / "cache"
    _fill(root)
    orphan = root / "blobs" / "zz" / "orphan.bin"  # something gc would delete
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    before = _snapshot(root)
    prefix = _read_only_prefix(mode, root)
    cmd = [*prefix, sys.executable, "-m", "fa4aot.tools.cli", *command, "--cache", str(root)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=shared_tmp, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    why = "Read-only file system" if mode == "erofs" else "Permission denied"
    assert f"the cache is read-only for this user ({why})" in p.stderr, p.stderr
    assert _snapshot(root) == before


def _wheel_args(built_cache: Path, out: Path) -> list[str]:
    return ["wheel", "--cache", str(built_cache), "--target", "h100", "-o", str(out)]


def _enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["output", "staging"])
def test_wheel_on_a_full_disk_is_a_clean_error_and_leaves_no_partial_wheel(built_cache, tmp_path, monkeypatch, where):
    """ENOSPC copying the wheel into -o (``output``: it used to leave a truncated .whl there) or
    writing its project in the temporary directory (``staging``): both used to be tracebacks."""
    from click.testing import CliRunner

    from fa4aot.tools.cli import main

    if where == "output":
        real_copy = shutil.copyfile

        def copyfile(src, dst, *a, **k):
            if not str(src).endswith(".whl"):
                return real_copy(src, dst, *a, **k)
            with open(src, "rb") as f, open(dst, "wb") as g:
                g.write(f.read(4096))  # what fitted before the disk filled up
            raise _enospc(dst)

        monkeypatch.setattr(shutil, "copyfile", copyfile)
    else:
        real_write = Path.write_text

        def write_text(self, *a, **k):
            if "fa4aot-wheel-" in str(self):
                raise _enospc(self)
            return real_write(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "dist"
    result = CliRunner().invoke(main, _wheel_args(built_cache, out))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "cannot build the wheel: the disk is full" in result.output and "Traceback" not in result.output
    assert list(out.iterdir()) == [], "a partial wheel (or its staging file) was left in -o"


def test_wheel_on_a_real_full_tmpfs_leaves_no_partial_wheel(built_cache, tmp_path):
    """The same on a real full disk: -o is a tmpfs too small for the wheel (needs mount rights
    in a private mount namespace; skipped elsewhere)."""
    out = tmp_path / "dist"
    out.mkdir()
    script = 'mount -t tmpfs -o size="$1" tmpfs "$0" || exit 99; shift; "$@"; rc=$?; ls -A "$0"; exit $rc'
    cmd = ["unshare", "-m", "sh", "-c", script, str(out), str(TINY_TMPFS)]
    cmd += [sys.executable, "-m", "fa4aot.tools.cli", *_wheel_args(built_cache, out)]
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode == 99 or "unshare:" in p.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()[:200]}")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "cannot build the wheel: the disk is full" in p.stderr, p.stderr
    assert p.stdout.strip() == "", f"left in the full -o: {p.stdout}"
