"""Trust what you install (issue 23), archives and stores (CPU): every key is recomputed from its
record at install and pull, a different record under an installed key is refused unless
--replace, records lack no field a served entry needs and carry a finite ``created``, and reading
an archive is bounded (tar extension headers, unpacked bytes, decompression ratio, FIFOs, slow
downloads, deep JSON). Each test reproduces one failure of the issue's probe."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from helpers import run_cli

from fa4aot import __version__
from fa4aot.compile import archive as archive_mod
from fa4aot.compile.archive import (
    ARCHIVE_FORMAT,
    MANIFEST_MEMBER,
    ArchiveLimitError,
    EntryKeyError,
    RecordConflictError,
    RecordError,
    install,
    open_source,
    read_archive,
)
from fa4aot.compile.store import CacheWriter
from fa4aot.compile.stores import LocalStore, fetch_entries, push, store_entries
from fa4aot.core.errors import CacheError
from fa4aot.core.index import BLOB_EXT, Cache, Entry
from fa4aot.core.variant import CACHE_FORMAT_VERSION
from fa4aot.runtime.loader import host_arch

#: The target whose four entries (one combine, three fwd_sm120) these tests ship.
TARGET = "rtx-pro-6000"
#: Address-space cap of every bounded CLI run: an unbounded reader fails fast instead of taking
#: the machine's memory (the probe saw 4.1 GB and 9.5 GB).
RUN_AS_BYTES = 1 << 30
#: Peak RSS a refused hostile archive may cost (fa4aot install of a good archive peaks at ~40 MB).
REFUSAL_RSS_MB = 200
ZERO_BLOB = 256 << 20  # the installer's largest blob: what a bomb fills with zeros


# --- sources: real entries of the session cache --------------------------------------------------


@pytest.fixture(scope="module")
def src(built_cache) -> dict:
    """The target's records (key -> text), blobs (sha256 -> bytes) and entries, with V (causal
    fwd_sm120) and W (non-causal fwd_sm120, same arch): what the tampering tests mix up."""
    cache = Cache(built_cache)
    entries = [e for e in cache.entries() if e.target.name == TARGET and e.host_arch == host_arch()]
    records = {e.key: next(iter(cache.records(e.key)))[1] for e in entries}
    blobs = {b.sha256: cache.read_blob(e, role) for e in entries for role, b in e.blobs.items()}
    fwd = [e for e in entries if e.variant.family == "fwd_sm120"]
    v = next(e for e in fwd if e.variant.fields.get("causal"))
    w = next(e for e in fwd if not e.variant.fields.get("causal"))
    return {"records": records, "blobs": blobs, "entries": entries, "V": v, "W": w}


def _tar(members: list[tuple[str, bytes]], *, pax: bool = False) -> bytes:
    """A tar of ``members``: USTAR as fa4aot pack writes it, or pax with extended headers."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:  # a pax 'x' header before every member, as other tar writers make
                info.pax_headers = {"comment": "repacked by another tool", "mtime": "1.5"}
            t.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _doc(records: dict[str, str], extra_blobs: dict[str, tuple[int, str]] | None = None) -> dict:
    """An archive document listing ``records`` and exactly the blobs they reference."""
    listed: dict[str, tuple[int, str]] = dict(extra_blobs or {})
    for text in records.values():
        for role, b in json.loads(text)["blobs"].items():
            listed[b["sha256"]] = (b["size"], BLOB_EXT.get(role, "bin"))
    return {
        "format": ARCHIVE_FORMAT,
        "cache_format": CACHE_FORMAT_VERSION,
        "fa4aot": __version__,
        "host_arch": host_arch(),
        "toolchains": [],
        "targets": [],
        "entries": [{"key": k, "record": t} for k, t in sorted(records.items())],
        "blobs": [{"sha256": s, "size": n, "ext": ext} for s, (n, ext) in sorted(listed.items())],
    }


def _archive(records: dict[str, str], blobs: dict[str, bytes], *, compress: str = "xz", pax: bool = False) -> bytes:
    """An archive of ``records`` with the blobs they reference (taken from ``blobs``)."""
    doc = _doc(records)
    members = [(MANIFEST_MEMBER, json.dumps(doc, sort_keys=True).encode())]
    members += [(f"blobs/{b['sha256']}.{b['ext']}", blobs[b["sha256"]]) for b in doc["blobs"]]
    raw = _tar(members, pax=pax)
    if compress == "xz":
        return lzma.compress(raw, format=lzma.FORMAT_XZ)
    return gzip.compress(raw) if compress == "gz" else raw


def _edit(text: str, **changes) -> str:
    meta = json.loads(text)
    meta.update(changes)
    return json.dumps(meta, sort_keys=True)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _state(root: Path) -> tuple:
    """What a refused command must leave unchanged: every file and every record."""
    if not root.exists():
        return ()
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())
    return files, sorted(Cache(root).records())


def _refused(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


BOUNDED = r"""
import json, resource, subprocess, sys, time
limit, timeout = int(sys.argv[1]), float(sys.argv[2])
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
t0 = time.monotonic()
try:
    p = subprocess.run(sys.argv[3:], preexec_fn=cap, capture_output=True, text=True, timeout=timeout)
    rc, out, err = p.returncode, p.stdout, p.stderr
except subprocess.TimeoutExpired:
    rc, out, err = -1, "", "timed out"
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rc": rc, "stdout": out[-3000:], "stderr": err[-3000:], "s": time.monotonic() - t0, "rss_mb": rss}))
"""


def _bounded_install(archive: Path, dst: Path, timeout: float = 60) -> dict:
    """``fa4aot install`` in a child capped at RUN_AS_BYTES of address space: its exit status,
    output, seconds and peak RSS (MB)."""
    cmd = [sys.executable, "-m", "fa4aot.tools.cli", "install", "--insecure", str(archive), "--cache", str(dst)]
    out = subprocess.run(
        [sys.executable, "-c", BOUNDED, str(RUN_AS_BYTES), str(timeout), *cmd], capture_output=True, text=True
    )
    return json.loads(out.stdout)


def _refused_within_bounds(bad: Path, dst: Path, message: str, max_seconds: float | None = None) -> None:
    """``bad`` refused by a bounded ``fa4aot install`` into ``dst``: exit status 1, ``message``
    and no traceback, under REFUSAL_RSS_MB (and ``max_seconds``), nothing installed. Then read in
    this process, only once the bounded run showed it is safe (unbounded, it took 24 GB here):
    an ArchiveLimitError saying ``message``."""
    res = _bounded_install(bad, dst)
    assert res["rc"] == 1 and message in res["stderr"] and "Traceback" not in res["stderr"], res
    assert res["rss_mb"] < REFUSAL_RSS_MB, res
    assert max_seconds is None or res["s"] < max_seconds, res
    assert not dst.exists()
    with open(bad, "rb") as f, pytest.raises(ArchiveLimitError, match=message):
        read_archive(f, host_arch=host_arch())


# --- 1. authenticity: keys recomputed, records under installed keys -----------------------------


def test_install_refuses_a_record_moved_under_another_variants_key(src, tmp_path):
    """W's record (non-causal) under V's key (causal): the runtime would serve W's kernel where
    it looks V up and `build` would call V cached. The key is recomputed from the record."""
    v, w = src["V"], src["W"]
    records = dict(src["records"])
    records[v.key] = records[w.key]
    bad = _write(tmp_path / "moved.fa4", _archive(records, src["blobs"]))
    with open(bad, "rb") as f, pytest.raises(EntryKeyError, match=v.key):
        read_archive(f, host_arch=host_arch())
    dst = tmp_path / "node"
    _refused(run_cli("install", "--insecure", str(bad), "--cache", str(dst), check=False), v.key, "recomputes to")
    assert not dst.exists()


@pytest.fixture
def store(src, built_cache, tmp_path) -> Path:
    """A directory store holding the target's entries."""
    root = tmp_path / "store"
    push(Cache(built_cache), LocalStore(root), src["entries"])
    return root


def test_pull_refuses_a_record_moved_under_another_variants_key(src, store, tmp_path):
    v, w = src["V"], src["W"]
    (store / "entries" / f"{v.key}.json").write_text(src["records"][w.key])
    dst = tmp_path / "node"
    _refused(run_cli("pull", "--insecure", str(store), "--cache", str(dst), check=False), v.key, "recomputes to")
    assert not dst.exists()
    st = LocalStore(store)  # the shared install path raises the typed error for pulls too
    with pytest.raises(EntryKeyError, match=v.key):
        install(dst, fetch_entries(st, [e.key for e in store_entries(st)], host_arch=host_arch()))
    assert not dst.exists()


def test_a_different_record_under_an_installed_key_is_refused_unless_replace(src, tmp_path):
    """V's real key and variant carrying W's blobs: the key recomputes, but it is not the record
    the cache holds under that key - never replaced silently; --replace does, and says so."""
    v, w = src["V"], src["W"]
    good = _write(tmp_path / "good.fa4", _archive(src["records"], src["blobs"]))
    dst = tmp_path / "node"
    run_cli("install", "--insecure", str(good), "--cache", str(dst))
    before = _state(dst)
    wmeta = json.loads(src["records"][w.key])
    records = dict(src["records"])
    records[v.key] = _edit(records[v.key], blobs=wmeta["blobs"], cubin=wmeta["cubin"])
    swapped = _write(tmp_path / "swapped.fa4", _archive(records, src["blobs"]))
    with open(swapped, "rb") as f:
        arc = read_archive(f, host_arch=host_arch())
    with pytest.raises(RecordConflictError, match=v.key):
        install(dst, arc)
    for extra in ((), ("--dry-run",)):
        _refused(
            run_cli("install", "--insecure", str(swapped), "--cache", str(dst), *extra, check=False), v.key, "--replace"
        )
        assert _state(dst) == before
    out = run_cli("install", "--insecure", str(swapped), "--cache", str(dst), "--replace").stdout
    assert f"replaced {v.key}" in out and "1 replaced" in out
    assert json.loads(dict(Cache(dst).records())[v.key])["cubin"] == wmeta["cubin"]
    n = len(records)
    assert f"0 added, {n} already present" in run_cli("install", "--insecure", str(swapped), "--cache", str(dst)).stdout


def test_pull_refuses_a_different_record_under_a_present_key_unless_replace(src, store, tmp_path):
    v = src["V"]
    dst = tmp_path / "node"
    run_cli("pull", "--insecure", str(store), "--cache", str(dst))
    before = _state(dst)
    changed = _edit(src["records"][v.key], origin="rebuilt elsewhere")
    (store / "entries" / f"{v.key}.json").write_text(changed)
    _refused(run_cli("pull", "--insecure", str(store), "--cache", str(dst), check=False), v.key, "--replace")
    assert _state(dst) == before
    out = run_cli("pull", "--insecure", str(store), "--cache", str(dst), "--replace").stdout
    assert f"replaced {v.key}" in out and "1 replaced" in out
    assert json.loads(dict(Cache(dst).records())[v.key])["origin"] == "rebuilt elsewhere"


# --- 2. record fields ------------------------------------------------------------------------------


CREATED = {"string": '"yesterday"', "NaN": "NaN", "Infinity": "Infinity", "overflow": "1e999", "bool": "true"}


@pytest.mark.parametrize("kind", list(CREATED))
def test_install_refuses_a_created_that_is_not_a_finite_number(src, tmp_path, kind):
    v = src["V"]
    records = dict(src["records"])
    records[v.key] = _edit(records[v.key], created="@").replace('"@"', CREATED[kind])
    bad = _write(tmp_path / "bad.fa4", _archive(records, src["blobs"]))
    with open(bad, "rb") as f, pytest.raises(RecordError, match=v.key):
        read_archive(f, host_arch=host_arch())
    dst = tmp_path / "node"
    _refused(run_cli("install", "--insecure", str(bad), "--cache", str(dst), check=False), v.key)
    assert not dst.exists()


@pytest.mark.parametrize("raw", ['"yesterday"', "NaN", "Infinity", "-Infinity", "1e999", "true", "null", "9" * 400])
def test_a_record_whose_created_is_not_a_time_is_malformed(src, raw):
    """Readers pick the newest entry of a variant by ``created``: a string raised ValueError in
    every later build/reindex/install, NaN and Infinity pinned an entry as newest."""
    v = src["V"]
    text = _edit(src["records"][v.key], created="@").replace('"@"', raw)
    with pytest.raises(CacheError, match=f"index record {v.key} is malformed"):
        Entry.from_json(v.key, text)
    for ok in ("0", "1796527046", "1796527046.25"):
        assert Entry.from_json(v.key, _edit(src["records"][v.key], created="@").replace('"@"', ok))


@pytest.fixture
def small_cache(src, tmp_path) -> Path:
    dst = tmp_path / "node"
    install(dst, read_archive(io.BytesIO(_archive(src["records"], src["blobs"])), host_arch=host_arch()))
    return dst


def _set_record(root: Path, key: str, text: str) -> None:
    w = CacheWriter(root)
    w._writer().set(key, text)  # what a damaged or hand-edited index holds
    w.close()


def test_an_installed_record_with_a_bad_created_is_a_damaged_entry_not_a_traceback(
    src, small_cache, built_cache, tmp_path
):
    """One record with ``"created": "yesterday"`` made every later reindex/install/build die with
    a ValueError traceback: now it is one damaged entry, reported, and replaceable."""
    v = src["V"]
    _set_record(small_cache, v.key, _edit(src["records"][v.key], created="yesterday"))
    p = run_cli("reindex", "--cache", str(small_cache), check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    cache = Cache(built_cache)
    other = next(e for e in cache.entries() if e.target.name == "h100" and e.host_arch == host_arch())
    blobs = {b.sha256: cache.read_blob(other, r) for r, b in other.blobs.items()}
    arc = _write(tmp_path / "other.fa4", _archive({other.key: next(iter(cache.records(other.key)))[1]}, blobs))
    p = run_cli("install", "--insecure", str(arc), "--cache", str(small_cache), check=False)
    assert p.returncode == 0 and "1 added" in p.stdout and "Traceback" not in p.stderr, p.stderr
    _refused(run_cli("verify", "--cache", str(small_cache), "--no-plans", check=False), v.key, "created")
    p = run_cli("check-plans", "--cache", str(small_cache), "-n", "2", check=False)
    assert p.returncode == 1 and v.key[:12] in p.stdout and "created" in p.stderr and "Traceback" not in p.stderr
    # the archive's good record replaces the damaged one on request
    good = _write(tmp_path / "good.fa4", _archive(src["records"], src["blobs"]))
    _refused(run_cli("install", "--insecure", str(good), "--cache", str(small_cache), check=False), v.key, "--replace")
    assert (
        f"replaced {v.key}"
        in run_cli("install", "--insecure", str(good), "--cache", str(small_cache), "--replace").stdout
    )
    assert "0 bad" in run_cli("verify", "--cache", str(small_cache), "--no-plans").stdout


def test_a_record_missing_its_signature_is_reported_by_verify_and_check_plans(src, small_cache):
    v = src["V"]
    meta = json.loads(src["records"][v.key])
    del meta["signature"]
    _set_record(small_cache, v.key, json.dumps(meta, sort_keys=True))
    _refused(run_cli("verify", "--cache", str(small_cache), check=False), f"BAD {v.key[:12]}", "'signature'")
    p = run_cli("check-plans", "--cache", str(small_cache), "-n", "2", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"{v.key[:12]}    0 calls" in p.stdout and "'signature'" in p.stderr
    p = run_cli("pack", "--cache", str(small_cache), "-o", str(small_cache.parent / "x.fa4"), check=False)
    _refused(p, v.key, "'signature'")
    assert not (small_cache.parent / "x.fa4").exists()


@pytest.mark.parametrize("field", ["signature", "kernels", "launch", "toolchain", "created"])
def test_install_refuses_a_record_missing_a_required_field(src, tmp_path, field):
    v = src["V"]
    meta = json.loads(src["records"][v.key])
    del meta[field]
    records = dict(src["records"])
    records[v.key] = json.dumps(meta, sort_keys=True)
    bad = _write(tmp_path / "bad.fa4", _archive(records, src["blobs"]))
    dst = tmp_path / "node"
    _refused(run_cli("install", "--insecure", str(bad), "--cache", str(dst), check=False), v.key, f"'{field}'")
    assert not dst.exists()


# --- 3. bounded reading ------------------------------------------------------------------------------


def _ext_header(kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo("././@LongLink" if kind in b"LK" else "PaxHeader/x")
    info.type, info.size = kind, size
    return info.tobuf(tarfile.USTAR_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


#: CVE-2024-6232's shape: records whose keyword runs to a far '=' (tarfile's pax regex scans to it
#: once per record: quadratic time, and a copy of the rest per record).
CVE_PAX = b"3 a" * 200_000 + b"=\n"
EXT_BOMBS = {
    "pax header, CVE-2024-6232 shape": (b"x", len(CVE_PAX), CVE_PAX),
    "pax header of 1 GiB": (b"x", 1 << 30, b""),
    "pax global header of 1 GiB": (b"g", 1 << 30, b""),
    "GNU long name of 1 GiB": (b"L", 1 << 30, b""),
    "GNU long name of 1 GiB, with its bytes": (b"L", 1 << 30, None),  # the probe's: 2.1 GB RSS
    "GNU long link of 1 GiB": (b"K", 1 << 30, b""),
}


@pytest.mark.parametrize(
    "kind",
    # (streaming the GiB itself takes ~5 s: the full tier; the same header without its bytes stays fast)
    [pytest.param(k, marks=pytest.mark.slow) if k.endswith("with its bytes") else k for k in EXT_BOMBS],
)
def test_an_oversized_tar_extension_header_is_refused_before_it_is_read(src, tmp_path, kind):
    typ, size, payload = EXT_BOMBS[kind]
    good = lzma.decompress(_archive(src["records"], src["blobs"]))
    if payload is None:  # the header's bytes follow it (zeros, streamed into xz)
        c = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=0)
        data = c.compress(_ext_header(typ, size)) + b"".join(c.compress(z) for z in _zeros(size)) + c.compress(good)
        data += c.flush()
    else:
        data = lzma.compress(_ext_header(typ, size) + _padded(payload) + good, format=lzma.FORMAT_XZ, preset=0)
    bad = _write(tmp_path / "bad.fa4", data)
    _refused_within_bounds(bad, tmp_path / "node", "extension header", max_seconds=20)


def test_a_chain_of_small_extension_headers_is_refused(src, tmp_path):
    good = lzma.decompress(_archive(src["records"], src["blobs"]))
    chain = b"".join(_ext_header(b"g", 12) + _padded(b"12 comment=\n") for _ in range(8))
    bad = io.BytesIO(lzma.compress(chain + good, format=lzma.FORMAT_XZ))
    with pytest.raises(ArchiveLimitError, match="extension headers before a member"):
        read_archive(bad, host_arch=host_arch())


@pytest.mark.parametrize("compress", ["gz", "tar"])
def test_gzip_plain_and_pax_archives_within_bounds_install(src, tmp_path, compress):
    """Bounded reading still takes what other tar and compression tools write: pax headers (with
    a fractional mtime) before every member, gzip or no compression."""
    arc = _write(tmp_path / f"a.{compress}", _archive(src["records"], src["blobs"], compress=compress, pax=True))
    out = run_cli("install", "--insecure", str(arc), "--cache", str(tmp_path / "node")).stdout
    assert f"{len(src['records'])} added" in out
    assert "0 bad" in run_cli("verify", "--cache", str(tmp_path / "node"), "--no-plans").stdout


_CHUNK = bytes(16 << 20)


def _zeros(size: int):
    """``size`` zero bytes, in pieces (never all at once)."""
    for start in range(0, size, len(_CHUNK)):
        yield _CHUNK[: min(len(_CHUNK), size - start)]


def _zeros_xz(prefix: bytes, members: list[tuple[str, int]]) -> bytes:
    """xz of the tar bytes ``prefix``, then members of ``size`` zero bytes each, then the end of
    the archive - compressed as a stream, never held unpacked (256 MiB of zeros is 39 KB of xz)."""
    c = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=0)
    out = [c.compress(prefix)]
    for name, size in members:
        info = tarfile.TarInfo(name)
        info.size = size
        out.append(c.compress(info.tobuf(tarfile.USTAR_FORMAT)))
        out += [c.compress(piece) for piece in _zeros(size)]
        out.append(c.compress(bytes(-size % 512)))
    out += [c.compress(bytes(1024)), c.flush()]
    return b"".join(out)


@functools.cache
def _zeros_sha(size: int) -> str:
    h = hashlib.sha256()
    for piece in _zeros(size):
        h.update(piece)
    return h.hexdigest()


def _without_end(tar: bytes) -> bytes:
    """A tar's members without its end-of-archive blocks (to append more members)."""
    end = len(tar)
    while end >= 512 and not tar[end - 512 : end].strip(b"\0"):
        end -= 512
    return tar[:end]


def _bomb(records: dict[str, str], blobs: dict[str, bytes], zeros: dict[str, int]) -> bytes:
    """An archive of ``records`` whose listed blobs ``zeros`` (sha256 -> size) are runs of zeros,
    listed after the real blobs."""
    doc = _doc(records, {sha: (size, "so") for sha, size in zeros.items()})
    members = [(MANIFEST_MEMBER, json.dumps(doc, sort_keys=True).encode())]
    members += [(f"blobs/{b['sha256']}.{b['ext']}", blobs[b["sha256"]]) for b in doc["blobs"] if b["sha256"] in blobs]
    return _zeros_xz(_without_end(_tar(members)), [(f"blobs/{sha}.so", size) for sha, size in zeros.items()])


@pytest.mark.slow  # (~5 s; the fast tier keeps the bomb in a used blob, below)
def test_an_xz_bomb_of_unused_listed_blobs_is_refused_unpacked_no_further(src, tmp_path):
    """The probe's 586 KB archive that installed at 4.1 GB RSS: listed blobs of zeros (sha256s
    right) that no entry uses, each within the per-blob limit. Here 4 of about 256 MiB."""
    zeros = {_zeros_sha(ZERO_BLOB - 512 * i): ZERO_BLOB - 512 * i for i in range(4)}
    bad = _write(tmp_path / "bomb.fa4", _bomb(src["records"], src["blobs"], zeros))
    assert bad.stat().st_size < 1 << 20
    _refused_within_bounds(bad, tmp_path / "node", "unpacks to more than")


def test_an_xz_bomb_in_a_used_blob_is_refused_by_its_expansion_ratio(src, tmp_path):
    """An entry whose plan is 256 MiB of zeros (its record, listing and sha256 consistent): the
    ratio of unpacked to compressed bytes gives it away long before it is all unpacked."""
    v = src["V"]
    sha = _zeros_sha(ZERO_BLOB)
    records = dict(src["records"])
    meta = json.loads(records[v.key])
    meta["blobs"]["plan"] = {"sha256": sha, "size": ZERO_BLOB}
    records[v.key] = json.dumps(meta, sort_keys=True)
    bad = _write(tmp_path / "bomb.fa4", _bomb(records, src["blobs"], {sha: ZERO_BLOB}))
    _refused_within_bounds(bad, tmp_path / "node", "decompression bomb")


def test_deeply_nested_json_is_a_typed_error_not_a_recursion_error(src, tmp_path):
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    bad = _write(tmp_path / "deep.fa4", lzma.compress(_tar([(MANIFEST_MEMBER, deep)]), format=lzma.FORMAT_XZ))
    _refused(
        run_cli("install", "--insecure", str(bad), "--cache", str(tmp_path / "node"), check=False), MANIFEST_MEMBER
    )
    v = src["V"]
    records = dict(src["records"])
    records[v.key] = _edit(records[v.key], origin="@").replace('"@"', "[" * 100 + "]" * 100)
    with pytest.raises(RecordError, match="nested deeper"):
        read_archive(io.BytesIO(_archive(records, src["blobs"])), host_arch=host_arch())
    assert not (tmp_path / "node").exists()


def test_installing_from_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "archive.fa4"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    _refused(
        run_cli("install", "--insecure", str(fifo), "--cache", str(tmp_path / "node"), check=False, timeout=20),
        "regular file",
    )
    assert time.monotonic() - t0 < 30 and not (tmp_path / "node").exists()


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Serves the archive one byte every 50 ms for at most 6 s (a server keeping a client busy)."""

    payload = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        stop = time.monotonic() + 6
        for i in range(len(self.payload)):
            if time.monotonic() > stop:
                break
            try:
                self.wfile.write(self.payload[i : i + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.05)

    def log_message(self, *args) -> None:
        pass


def test_a_trickling_download_is_abandoned_at_the_deadline(src, monkeypatch):
    handler = type("H", (_Trickle,), {"payload": _archive(src["records"], src["blobs"])})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(archive_mod, "DOWNLOAD_DEADLINE_S", 1.0)
        stream, what = open_source(f"http://127.0.0.1:{server.server_address[1]}/a.fa4")
        t0 = time.monotonic()
        with stream, pytest.raises(ArchiveLimitError, match="longer than 1 s"):
            read_archive(stream, host_arch=host_arch(), what=what)
        assert time.monotonic() - t0 < 4
    finally:
        server.shutdown()
