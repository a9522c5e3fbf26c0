"""Shipping caches (CPU): pack/install round trip and determinism, hostile archives, concurrent
installs with a build, cache wheels installed into a fresh venv and found by the runtime and the
CLI, remote stores (directory, HTTP on 127.0.0.1, fsspec memory://), show-config."""

from __future__ import annotations

import functools
import http.server
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fake_driver import FakeDriver
from helpers import FAST_MANIFEST, HAS_DSL, ROOT, run_cli

from fa4aot.compile.archive import ArchiveError, cache_entries, pack_bytes, read_archive
from fa4aot.core.index import Cache
from fa4aot.runtime.loader import Runtime, host_arch


def records(root: Path) -> dict[str, str]:
    return dict(Cache(root).records())


@pytest.fixture(scope="module")
def archive(built_cache, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("arc") / "ci.fa4"
    run_cli("pack", "--cache", str(built_cache), "-o", str(p))
    return p


@pytest.fixture(scope="module")
def small_archive(built_cache, tmp_path_factory) -> Path:
    """The two entries of one target: what the hostile-archive tests damage."""
    p = tmp_path_factory.mktemp("arc") / "small.fa4"
    run_cli("pack", "--cache", str(built_cache), "--target", "rtx-pro-6000", "-o", str(p))
    return p


@pytest.fixture(scope="module")
def small_node(small_archive, tmp_path_factory) -> Path:
    """A cache ``small_archive`` was installed into (each hostile-archive test copies it)."""
    node = tmp_path_factory.mktemp("small-node") / "node"
    run_cli("install", "--insecure", str(small_archive), "--cache", str(node))
    return node


def test_pack_install_round_trip_equals_the_source(built_cache, archive, tmp_path):
    dst = tmp_path / "node"
    out = run_cli("install", "--insecure", str(archive), "--cache", str(dst)).stdout
    src = records(built_cache)
    assert records(dst) == src and f"{len(src)} added, 0 already present" in out
    assert "0 bad" in run_cli("verify", "--cache", str(dst)).stdout
    # idempotent: a second install changes nothing
    before = {p: p.stat().st_mtime_ns for p in (dst / "blobs").rglob("*") if p.is_file()}
    assert (
        f"0 added, {len(src)} already present"
        in run_cli("install", "--insecure", str(archive), "--cache", str(dst)).stdout
    )
    assert before == {p: p.stat().st_mtime_ns for p in (dst / "blobs").rglob("*") if p.is_file()}
    # the runtime opens it and loads what it holds
    rt = Runtime(dst, driver=FakeDriver(cc=(9, 0), num_sms=132))
    assert rt.preload("all") == len(rt.variant_ids()) > 0


def test_stdin_install_and_dry_run(archive, tmp_path):
    dst = tmp_path / "node"
    p = run_cli("install", "--insecure", "-", "--cache", str(dst), "--dry-run", stdin=open(archive, "rb"))
    assert "would add" in p.stdout and not dst.exists()
    run_cli("install", "--insecure", "-", "--cache", str(dst), stdin=open(archive, "rb"))
    assert (dst / "index" / "cache.db").exists()


def test_pack_is_deterministic(built_cache, tmp_path):
    a, b = tmp_path / "a.fa4", tmp_path / "b.fa4"
    run_cli("pack", "--cache", str(built_cache), "--target", "h100", "-o", str(a))
    copy = tmp_path / "copy"
    shutil.copytree(built_cache, copy)
    for p in (copy / "blobs").rglob("*"):  # timestamps must not matter
        os.utime(p, (1, 1))
    run_cli("pack", "--cache", str(copy), "--target", "h100", "-o", str(b))
    assert a.read_bytes() == b.read_bytes()


def test_pack_manifest_is_exact_and_names_what_is_missing(built_cache, tmp_path):
    out = tmp_path / "m.fa4"
    run_cli("pack", "--cache", str(built_cache), "--manifest", str(FAST_MANIFEST), "-o", str(out))
    from fa4aot.compile import manifest

    want = {pv.variant.variant_id for pv in manifest.load(FAST_MANIFEST).variants}
    with open(out, "rb") as f:
        got = {e.variant_id for e in read_archive(f, host_arch=host_arch()).entries}
    assert got == want
    m = tmp_path / "more.yaml"
    m.write_text(
        "target: {name: h100, arch: sm_90a, num_sms: 132}\nfamilies:\n  fwd_sm90:\n    - head_dims: [[96, 96]]\n"
    )
    p = run_cli("pack", "--cache", str(built_cache), "--manifest", str(m), "-o", str(tmp_path / "x.fa4"), check=False)
    assert p.returncode == 1 and "lacks 1 variant(s)" in p.stderr and "head_dim=96" in p.stderr
    assert not (tmp_path / "x.fa4").exists()


# --- hostile archives ------------------------------------------------------------------------------


def _members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive, "r:xz") as t:
        return [(m, t.extractfile(m).read()) for m in t]


def _write(members, path: Path) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(lzma.compress(raw.getvalue(), format=lzma.FORMAT_XZ))
    return path


def _doc_edit(members, **changes):
    info, data = members[0]
    doc = json.loads(data)
    doc.update(changes)
    new = json.dumps(doc).encode()
    info = tarfile.TarInfo(info.name)
    info.size = len(new)
    return [(info, new)] + members[1:]


def _extra(name, kind=tarfile.REGTYPE, data=b"x", linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return (info, data)


def _flip_blob(members):
    out = list(members)
    info, data = out[1]
    out[1] = (info, bytes([data[0] ^ 1]) + data[1:])
    return out


def _bad_key(members):
    doc = json.loads(members[0][1])
    doc["entries"][0]["key"] = "../../evil"
    return _doc_edit(members, entries=doc["entries"])


HOSTILE = {
    "entry key not a cache key": (_bad_key, "is not a cache key"),
    "traversal": (lambda m: m[:1] + [_extra("../evil")] + m[1:], "unsafe path"),
    "absolute": (lambda m: m[:1] + [_extra("/tmp/evil")] + m[1:], "unsafe path"),
    "symlink": (
        lambda m: m[:1] + [_extra("blobs/x", tarfile.SYMTYPE, b"", "/etc/passwd")] + m[1:],
        "not a regular file",
    ),
    "hardlink": (
        lambda m: m[:1] + [_extra("blobs/x", tarfile.LNKTYPE, b"", "fa4aot-archive.json")] + m[1:],
        "not a regular file",
    ),
    "device": (lambda m: m[:1] + [_extra("blobs/x", tarfile.CHRTYPE, b"")] + m[1:], "not a regular file"),
    "wrong sha256": (_flip_blob, "does not match its sha256"),
    "missing blob": (lambda m: m[:-1], "truncated"),
    "unlisted member": (lambda m: m + [_extra("blobs/" + "0" * 64 + ".so")], "not listed"),
    "manifest not first": (lambda m: m[1:2] + m[:1] + m[2:], "first member"),
    "wrong host arch": (lambda m: _doc_edit(m, host_arch="aarch64" if host_arch() != "aarch64" else "x86_64"), "hosts"),
    "wrong archive format": (lambda m: _doc_edit(m, format="fa4aot-archive/9"), "archive format"),
    "wrong cache format": (lambda m: _doc_edit(m, cache_format=1), "cache format 1"),
    "newer fa4aot": (lambda m: _doc_edit(m, fa4aot="99.0.0"), "newer than this"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_archives_are_refused_and_nothing_is_written(small_archive, small_node, tmp_path, kind):
    archive = small_archive
    make, match = HOSTILE[kind]
    bad = _write(make(_members(archive)), tmp_path / "bad.fa4")
    dst = tmp_path / "node"
    p = run_cli("install", "--insecure", str(bad), "--cache", str(dst), check=False)
    assert p.returncode == 1 and match in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not dst.exists()
    # into an existing cache (the archive installed): nothing changes either
    shutil.copytree(small_node, dst, symlinks=True)
    before = sorted(str(x.relative_to(dst)) for x in dst.rglob("*"))
    assert run_cli("install", "--insecure", str(bad), "--cache", str(dst), check=False).returncode == 1
    assert sorted(str(x.relative_to(dst)) for x in dst.rglob("*")) == before
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_archives_are_refused(archive, tmp_path, cut):
    data = archive.read_bytes()
    bad = tmp_path / "cut.fa4"
    bad.write_bytes(data[: int(len(data) * cut)])
    p = run_cli("install", "--insecure", str(bad), "--cache", str(tmp_path / "node"), check=False)
    assert p.returncode == 1 and ("truncated" in p.stderr or "damaged" in p.stderr)
    assert not (tmp_path / "node").exists()


def test_a_cubin_that_does_not_parse_is_refused(built_cache, tmp_path):
    """Consistent hashes are not enough: a cubin blob that is not a cubin is refused."""
    cache = Cache(built_cache)
    e = next(x for x in cache_entries(cache) if x.target.name == "h100")
    data, _ = pack_bytes(cache, [e], host_arch())
    members = _members_bytes(data)
    doc = json.loads(members[0][1])
    header = e.blobs["header"]
    rec = json.loads(doc["entries"][0]["record"])
    # the entry's cubin is now its header blob (present in the archive, hashes consistent)
    rec["blobs"]["cubin"] = {"sha256": header.sha256, "size": header.size}
    rec["cubin"].update(sha256=header.sha256, size=header.size)
    doc["entries"][0]["record"] = json.dumps(rec, sort_keys=True)
    assert any(b["sha256"] == header.sha256 for b in doc["blobs"])
    new = json.dumps(doc).encode()
    info = tarfile.TarInfo(members[0][0].name)
    info.size = len(new)
    bad = _write([(info, new)] + members[1:], tmp_path / "bad.fa4")
    with open(bad, "rb") as f, pytest.raises(ArchiveError, match="cubin"):
        read_archive(f, host_arch=host_arch())


def _members_bytes(data: bytes):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as t:
        return [(m, t.extractfile(m).read()) for m in t]


# --- concurrency ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DSL, reason="the concurrent build needs the build extra")
def test_concurrent_installs_and_a_build_end_consistent(built_cache, tmp_path):
    parts = []
    for target in sorted({e.target.name for e in Cache(built_cache).entries()}):
        p = tmp_path / f"{target}.fa4"
        run_cli("pack", "--cache", str(built_cache), "--target", target, "-o", str(p))
        parts.append(p)
    m = tmp_path / "small.yaml"
    m.write_text(
        "target: {name: h100, arch: sm_90a, num_sms: 132}\nfamilies:\n  combine:\n    - head_dim: 64\n      num_head: 8\n"
    )
    dst = tmp_path / "shared"
    jobs = [("install", "--insecure", str(p), "--cache", str(dst)) for p in parts * 2] + [
        ("build", str(m), "--cache", str(dst), "-q")
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        procs = list(pool.map(lambda a: run_cli(*a, check=False), jobs))
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    got = records(dst)
    assert set(records(built_cache)) <= set(got) and len(got) == len(records(built_cache)) + 1
    assert "0 bad" in run_cli("verify", "--cache", str(dst)).stdout


# --- wheels -----------------------------------------------------------------------------------------


SCRIPT = """
import os, sys, json
sys.path.insert(0, {tests!r})
from fake_driver import FakeDriver
from fa4aot.runtime.loader import Runtime
cc = tuple(json.loads(sys.argv[1]))
rt = Runtime(driver=FakeDriver(cc=cc, num_sms=int(sys.argv[2])))
n = rt.preload("all")
print(json.dumps({{"root": str(rt.cache.root), "loaded": n}}))
"""


@pytest.fixture(scope="module")
def wheel_env(built_cache, tmp_path_factory):
    """A fresh venv with the h100 and b200 cache wheels pip-installed (fa4aot itself and its
    dependencies come from this checkout and the test environment, on PYTHONPATH)."""
    tmp = tmp_path_factory.mktemp("wheels")
    for target in ("h100", "b200"):
        run_cli("wheel", "--cache", str(built_cache), "--target", target, "-o", str(tmp / "dist"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    wheels = sorted(str(p) for p in (tmp / "dist").glob("*.whl"))
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels], check=True)
    import site

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *site.getsitepackages()]))
    env.pop("FA4AOT_CACHE", None)
    return py, env, tmp


def test_an_installed_wheel_is_found_by_the_runtime_and_the_cli(wheel_env, tmp_path):
    py, env, _ = wheel_env
    script = SCRIPT.format(tests=str(ROOT / "tests"))
    out = subprocess.run([py, "-c", script, "[9, 0]", "132"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    # the b200 wheel sorts first; the runtime passes over it to the wheel serving this GPU
    assert "fa4aot_cache_h100" in res["root"] and "site-packages" in res["root"] and res["loaded"] > 0
    out = subprocess.run([py, "-c", script, "[10, 0]", "148"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert "fa4aot_cache_b200" in json.loads(out.stdout)["root"]
    ls = subprocess.run([py, "-m", "fa4aot.tools.cli", "ls"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert ls.returncode == 0 and "fwd_sm" in ls.stdout, ls.stderr
    cfg = subprocess.run(
        [py, "-m", "fa4aot.tools.cli", "show-config"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert "wheel fa4aot_cache_b200" in cfg.stdout and "wheel fa4aot_cache_h100" in cfg.stdout
    assert "gb200 (NVIDIA GB200: sm_100a, 152 SMs)" in cfg.stdout  # the model table, core/targets.py


def test_search_order_env_then_wheels_then_local(wheel_env, built_cache, tmp_path):
    py, env, _ = wheel_env
    script = SCRIPT.format(tests=str(ROOT / "tests"))
    local = tmp_path / "cache"
    shutil.copytree(built_cache, local, dirs_exist_ok=True)
    out = subprocess.run(
        [py, "-c", script, "[9, 0]", "132"],
        env=dict(env, FA4AOT_CACHE=str(built_cache)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout)["root"] == str(built_cache)  # $FA4AOT_CACHE first
    out = subprocess.run([py, "-c", script, "[9, 0]", "132"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert "fa4aot_cache_h100" in json.loads(out.stdout)["root"]  # wheels before ./cache
    out = subprocess.run([py, "-c", script, "[9, 0]", "114"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "searched" not in out.stderr  # ./cache answers (an SM-count mismatch)
    assert "114" in out.stderr


def test_an_installed_wheel_is_verified_like_any_cache(wheel_env, tmp_path):
    py, env, tmp = wheel_env
    site = subprocess.run(
        [py, "-c", "import fa4aot_cache_h100 as m; print(m.cache_dir())"], env=env, capture_output=True, text=True
    )
    root = Path(site.stdout.strip())
    blob = next((root / "blobs").rglob("*.so"))
    saved = blob.read_bytes()
    try:
        blob.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        code = (
            SCRIPT.format(tests=str(ROOT / "tests")).replace("n = rt.preload", "n = 0 and rt.preload")
            + "\ntry:\n    rt.preload('all')\nexcept Exception as e:\n    print(type(e).__name__)\n"
        )
        out = subprocess.run([py, "-c", code, "[9, 0]", "132"], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert "CorruptArtifactError" in out.stdout, out.stdout + out.stderr
    finally:
        blob.write_bytes(saved)


# --- remote stores ----------------------------------------------------------------------------------


def test_push_and_pull_through_a_directory_move_only_what_is_missing(built_cache, tmp_path):
    store = tmp_path / "store"
    out = run_cli("push", str(store), "--cache", str(built_cache)).stdout
    n = len(records(built_cache))
    assert f"pushed {n} entries" in out
    assert "0 objects uploaded" in run_cli("push", str(store), "--cache", str(built_cache)).stdout
    dst = tmp_path / "node"
    run_cli("pull", "--insecure", str(store), "--cache", str(dst), "--target", "h100")
    h100 = {k for k, t in records(built_cache).items() if '"name": "h100"' in t}
    assert set(records(dst)) == h100
    assert f"pulled {n - len(h100)} entries" in run_cli("pull", "--insecure", str(store), "--cache", str(dst)).stdout
    assert records(dst) == records(built_cache)
    assert "pulled 0 entries" in run_cli("pull", "--insecure", str(store), "--cache", str(dst)).stdout


@pytest.fixture
def http_store(built_cache, tmp_path):
    root = tmp_path / "served"
    run_cli("push", str(root), "--cache", str(built_cache), "--target", "h100")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_pull_over_http(http_store, tmp_path):
    url, _ = http_store
    dst = tmp_path / "node"
    out = run_cli(
        "pull", "--insecure", url, "--cache", str(dst), "--manifest", str(FAST_MANIFEST), "--target", "h100"
    ).stdout
    assert "pulled" in out and "0 bad" in run_cli("verify", "--cache", str(dst)).stdout
    p = run_cli("push", url, "--cache", str(dst), check=False)
    assert p.returncode == 1 and "read-only" in p.stderr


def test_a_tampered_blob_on_the_server_is_refused(http_store, tmp_path):
    url, root = http_store
    blob = next((root / "blobs").iterdir())
    data = blob.read_bytes()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    dst = tmp_path / "node"
    p = run_cli("pull", "--insecure", url, "--cache", str(dst), check=False)
    assert p.returncode == 1 and "fails its sha256" in p.stderr and not dst.exists()


def test_pull_from_fsspec_memory(built_cache, tmp_path):
    pytest.importorskip("fsspec")
    from fa4aot.compile.archive import install
    from fa4aot.compile.stores import fetch_entries, open_store, push, store_entries

    store = open_store("memory://fa4aot-test-store")
    cache = Cache(built_cache)
    written, n = push(cache, store, cache_entries(cache))
    assert written >= n > 0
    assert push(cache, store, cache_entries(cache))[0] == 0
    dst = tmp_path / "node"
    arc = fetch_entries(store, [e.key for e in store_entries(store)], host_arch=host_arch())
    install(dst, arc)
    assert records(dst) == records(built_cache)


@pytest.mark.parametrize(
    "store, match",
    [("does-not-exist", "has no INDEX"), ("s3x://bucket", "Protocol not known"), ("http://127.0.0.1:9", "GET")],
)
def test_pulling_from_a_missing_or_unknown_store_is_a_clear_error(tmp_path, store, match):
    if store.startswith("s3x"):
        pytest.importorskip("fsspec", reason="an fsspec URL needs fsspec (the remote extra)")
    p = run_cli(
        "pull",
        "--insecure",
        store if "://" in store else str(tmp_path / store),
        "--cache",
        str(tmp_path / "c"),
        check=False,
    )
    assert p.returncode == 1 and match in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "c").exists()
