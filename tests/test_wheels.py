"""Cache wheels as pip sees them (issue 26, part 3): a version derived from the content, so a
rebuilt cache's wheel is installed over the old one and an unchanged one is left alone; a
manylinux platform tag of the launch plans' host arch (plans of two host arches refused);
`Requires-Dist: fa4aot` within this major version; a license file; `--max-size` splitting into
one wheel per GPU target with an index, a target too large for the limit refused, signing of
every wheel, and split wheels found by the runtime. CPU only (the fake driver)."""

from __future__ import annotations

import datetime
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, run_cli

import fa4aot
from fa4aot.compile.archive import ArchiveError, cache_entries, install, pack_bytes, read_archive, select_entries
from fa4aot.compile.wheel import build_wheels, content_version, parse_size, platform_tag
from fa4aot.core.index import Cache, Entry
from fa4aot.runtime.loader import host_arch

packaging_version = pytest.importorskip("packaging.version")
packaging_requirements = pytest.importorskip("packaging.requirements")

HOST = host_arch()
#: A cache wheel's file name: distribution, version, and the tag of this host's launch plans.
WHEEL_NAME = re.compile(rf"(?P<dist>[a-z0-9_]+)-(?P<version>[^-]+)-py3-none-manylinux_2_(?P<glibc>[0-9]+)_{HOST}\.whl")
#: What the runtime prints (tests/test_deliver.py's script): the cache it chose and what it loaded.
RUNTIME = """
import sys, json
sys.path.insert(0, {tests!r})
from fake_driver import FakeDriver
from fa4aot.runtime.loader import Runtime
rt = Runtime(driver=FakeDriver(cc=tuple(json.loads(sys.argv[1])), num_sms=int(sys.argv[2])))
n = rt.preload("all")
print(json.dumps({{"root": str(rt.cache.root), "loaded": n}}))
"""


def _selection(root: Path, target: str | None = None) -> list[Entry]:
    """The entries `fa4aot wheel` selects from ``root`` (this host's), of one target or all."""
    entries = select_entries(cache_entries(Cache(root)), str(root), host_arch=HOST)
    return [e for e in entries if target is None or e.target.name == target]


def _records(root: Path, entries: list[Entry]) -> dict[str, str]:
    cache = Cache(root)
    return {e.key: next(iter(cache.records(e.key)))[1] for e in entries}


def _wheels(out: Path) -> list[Path]:
    return sorted(out.glob("*.whl"))


def _venv(where: Path) -> Path:
    """A fresh venv (no pip of its own: the test environment's pip installs into it, offline)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    return where / "bin" / "python"


def _pip_install(py: Path, *wheels: Path) -> str:
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _env(with_site: bool = False) -> dict[str, str]:
    """fa4aot from this checkout (cache wheels are installed with --no-deps) and, ``with_site``,
    the test environment's packages after the venv's own; no $FA4AOT_CACHE."""
    import site

    env = {k: v for k, v in os.environ.items() if k != "FA4AOT_CACHE"}
    return dict(env, PYTHONPATH=os.pathsep.join([str(ROOT), *(site.getsitepackages() if with_site else [])]))


# --- sizes and versions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100MB", 100_000_000),
        ("100mb", 100_000_000),
        ("1.5GiB", 1_610_612_736),
        ("2 KiB", 2048),
        ("1.1GB", 1_100_000_000),
        ("4096", 4096),
        ("7B", 7),
        ("3kB", 3000),
    ],
)
def test_sizes_parse_with_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "ten MB", "10XB", "-5MB", "0", "0MB", "1e3", "1.5.2MB"])
def test_a_malformed_size_is_refused(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_the_derived_version_follows_the_content(built_cache):
    entries = _selection(built_cache, "h100")
    records = _records(built_cache, entries)
    v = content_version(entries, records, None)
    m = re.fullmatch(r"1\.0\.([0-9]{14})\+([0-9a-f]{12})", v)
    assert m, v
    newest = max(e.meta["created"] for e in entries)
    assert m.group(1) == datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).strftime("%Y%m%d%H%M%S")
    Version = packaging_version.Version
    assert str(Version(v)) == v  # normalized: the wheel's file name holds exactly this
    assert Version(v) > Version("1.0.0")  # above the former fixed default: -U upgrades old wheels
    assert content_version(entries[::-1], records, None) == v  # the same content, the same version
    assert content_version(entries[:-1], records, None) != v  # an entry fewer
    changed = dict(records)
    doc = json.loads(changed[entries[0].key])
    doc["compile_seconds"] = float(doc.get("compile_seconds", 0)) + 1
    changed[entries[0].key] = json.dumps(doc)
    assert content_version(entries, changed, None) != v  # a record replaced under its key
    assert content_version(entries, records, "ed25519:" + "A" * 43 + "=") != v  # signed
    # a rebuild (a newer entry) sorts after the old version for `pip install -U`
    later = [entries[0]._replace(meta={**entries[0].meta, "created": newest + 3600}), *entries[1:]]
    assert Version(content_version(later, changed, None)) > Version(v)


def test_the_platform_tag_is_the_plans_host_arch_and_glibc():
    plans = [b"\x7fELF...memcpy\0GLIBC_2.14\0GLIBC_2.2.5\0", b"GLIBC_2.3\0"]
    assert platform_tag("x86_64", plans) == "manylinux_2_17_x86_64"  # never below manylinux2014
    assert platform_tag("aarch64", [b"\0GLIBC_2.28\0", b"GLIBC_2.17"]) == "manylinux_2_28_aarch64"
    assert platform_tag("aarch64", []) == "manylinux_2_17_aarch64"
    with pytest.raises(ArchiveError, match="platform tag"):
        platform_tag("x86-64; rm", plans)


def test_a_wheel_of_two_host_arches_is_refused(built_cache, tmp_path):
    entries = _selection(built_cache, "h100")
    other = "aarch64" if HOST != "aarch64" else "x86_64"
    mixed = [entries[0]._replace(meta={**entries[0].meta, "host_arch": other}), *entries[1:]]
    out = tmp_path / "dist"
    with pytest.raises(ArchiveError, match=rf"host arch\(es\) .*{other}.*one wheel per host arch"):
        build_wheels(Cache(built_cache), mixed, out, name="fa4aot-cache-h100", host_arch=HOST)
    assert not out.exists()


# --- one wheel: metadata ------------------------------------------------------------------------


def test_a_cache_wheel_declares_its_platform_dependency_and_licenses(built_cache, tmp_path):
    run_cli("wheel", "--cache", str(built_cache), "--target", "h100", "-o", str(tmp_path / "a"))
    run_cli("wheel", "--cache", str(built_cache), "--target", "h100", "-o", str(tmp_path / "b"))
    (wheel,) = _wheels(tmp_path / "a")
    assert [p.name for p in _wheels(tmp_path / "b")] == [wheel.name]  # deterministic version
    m = WHEEL_NAME.fullmatch(wheel.name)
    assert m and m["dist"] == "fa4aot_cache_h100" and int(m["glibc"]) >= 17, wheel.name
    dist_info = f"fa4aot_cache_h100-{m['version']}.dist-info"
    with zipfile.ZipFile(wheel) as z:
        tags = z.read(f"{dist_info}/WHEEL").decode()
        metadata = z.read(f"{dist_info}/METADATA").decode()
        license_file = z.read(f"{dist_info}/licenses/LICENSE").decode()
    assert f"Tag: py3-none-manylinux_2_{m['glibc']}_{HOST}\n" in tags
    assert f"Version: {m['version']}\n" in metadata and "License-File: LICENSE\n" in metadata
    (requires,) = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    req = packaging_requirements.Requirement(requires)
    major = int(fa4aot.__version__.split(".")[0])
    assert req.name == "fa4aot" and req.specifier.contains(fa4aot.__version__, prereleases=True)
    assert not req.specifier.contains(f"{major + 1}.0.0") and not req.specifier.contains("0.0.1")
    # what the wheel holds and under which terms, with the licenses binary redistribution requires
    assert (ROOT / "LICENSE").read_text() in license_file
    assert "Copyright (c) 2022, the respective contributors" in license_file and "Tri Dao" in license_file
    assert "Apache License\n                           Version 2.0, January 2004" in license_file
    assert '"NVIDIA Software License Agreement"' in license_file
    toolchain = _selection(built_cache, "h100")[0].meta["toolchain"]
    for name in ("flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels"):
        assert f"{name} {toolchain[name]}" in license_file


@pytest.mark.parametrize("version", ["2.1.0", "2026.6.1.post1", "1.0.0+ci.7"])
def test_an_explicit_version_is_the_wheels(built_cache, tmp_path, version):
    run_cli("wheel", "--cache", str(built_cache), "--target", "h100", "--version", version, "-o", str(tmp_path))
    (wheel,) = _wheels(tmp_path)
    assert WHEEL_NAME.fullmatch(wheel.name)["version"] == version
    assert not list(tmp_path.glob("*.json"))  # no index without --max-size


@pytest.mark.parametrize("version", ["v1", "1.0.0-rc1", "1.0.0+CI", ""])
def test_a_version_pip_would_rename_is_refused(built_cache, tmp_path, version):
    p = run_cli(
        "wheel", "--cache", str(built_cache), "--target", "h100", "--version", version, "-o", str(tmp_path), check=False
    )
    assert p.returncode == 1 and "--version" in p.stderr and "PEP 440" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_rebuilt_cache_wheel_is_installed_over_the_old_one(built_cache, tmp_path):
    """pip installs a wheel file over an installed distribution only when the versions differ:
    with the former fixed 1.0.0 the rebuilt cache's wheel was "already installed" and the old
    kernels stayed."""
    entries = _selection(built_cache, "h100")
    old = tmp_path / "old-cache"  # the cache before a rebuild added one variant
    data, _ = pack_bytes(Cache(built_cache), entries[:-1], HOST)
    install(old, read_archive(io.BytesIO(data), host_arch=HOST))
    for cache, out in ((old, "old"), (built_cache, "new")):
        run_cli("wheel", "--cache", str(cache), "--target", "h100", "-o", str(tmp_path / out))
    (w_old,), (w_new,) = _wheels(tmp_path / "old"), _wheels(tmp_path / "new")
    assert w_old.name != w_new.name
    py = _venv(tmp_path / "venv")
    code = (
        "import importlib.metadata as m, fa4aot_cache_h100 as c\n"
        "from fa4aot.core.index import Cache\n"
        "print(m.version('fa4aot-cache-h100'), len(list(Cache(c.cache_dir()).records())))\n"
    )

    def installed() -> tuple[str, int]:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, env=_env(), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        version, n = out.stdout.split()
        return version, int(n)

    _pip_install(py, w_old)
    assert installed() == (WHEEL_NAME.fullmatch(w_old.name)["version"], len(entries) - 1)
    _pip_install(py, w_new)
    assert installed() == (WHEEL_NAME.fullmatch(w_new.name)["version"], len(entries))
    assert len(list((tmp_path / "venv").rglob("fa4aot_cache_h100-*.dist-info"))) == 1
    assert "already installed" in _pip_install(py, w_new)  # the same content: nothing to do


# --- --max-size: one wheel per target --------------------------------------------------------------


@pytest.fixture(scope="module")
def split(built_cache, tmp_path_factory) -> Path:
    """The fast cache's wheels, split with a limit every target fits."""
    out = tmp_path_factory.mktemp("split")
    run_cli("wheel", "--cache", str(built_cache), "--max-size", "10GB", "-o", str(out))
    return out


def _by_target(entries: list[Entry]) -> dict[tuple[str, int], list[Entry]]:
    groups: dict[tuple[str, int], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.target.arch, e.target.num_sms), []).append(e)
    return groups


@pytest.mark.slow
def test_max_size_splits_one_wheel_per_target_with_an_index(built_cache, split, tmp_path):
    groups = _by_target(_selection(built_cache))
    wheels = _wheels(split)
    assert len(wheels) == len(groups) > 1
    sizes = sorted(w.stat().st_size for w in wheels)
    # room for a rebuilt wheel's few bytes of difference (its index database is not byte-stable),
    # and less than all the targets need together: one wheel could not hold them
    limit = sizes[-1] + 4096
    assert sum(sizes) > limit
    out = tmp_path / "dist"
    run_cli("wheel", "--cache", str(built_cache), "--max-size", str(limit), "-o", str(out))
    assert [w.name for w in _wheels(out)] == [w.name for w in wheels]  # the same set, one version
    assert all(w.stat().st_size <= limit for w in _wheels(out))
    (index_file,) = out.glob("*.wheels.json")
    index = json.loads(index_file.read_text())
    assert index_file.name == f"fa4aot_cache-{index['version']}.wheels.json" and index["host_arch"] == HOST
    served = {}
    for row in index["wheels"]:
        path = out / row["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"] and path.stat().st_size == row["size"]
        (t,) = row["targets"]
        group = groups[(t["arch"], t["num_sms"])]
        assert row["entries"] == len(group) and row["families"] == sorted({e.variant.family for e in group})
        assert t["name"] in {e.target.name for e in group} and row["distribution"] == f"fa4aot-cache-{t['name']}"
        with zipfile.ZipFile(path) as z:
            packed = [n for n in z.namelist() if "/cache/packed/" in n and n.endswith(".idx")]
        # the wheel serves exactly its target: one packed index, of that target
        assert [Path(n).name.split("-")[:3] for n in packed] == [[t["arch"], str(t["num_sms"]), HOST]]
        served[(t["arch"], t["num_sms"])] = row["file"]
    assert set(served) == set(groups)


def test_a_target_larger_than_max_size_is_refused_and_nothing_is_written(built_cache, split, tmp_path):
    *_, second, largest = sorted(_wheels(split), key=lambda w: w.stat().st_size)
    target = WHEEL_NAME.fullmatch(largest.name)["dist"].removeprefix("fa4aot_cache_").replace("_", "-")
    assert largest.stat().st_size - second.stat().st_size > 8192
    limit = (largest.stat().st_size + second.stat().st_size) // 2  # only the largest target is over it
    out = tmp_path / "dist"
    cmd = ("wheel", "--cache", str(built_cache), "--max-size", str(limit), "-o", str(out))
    p = run_cli(*cmd, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "over --max-size" in p.stderr and f"{target} (" in p.stderr and "cannot be split" in p.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_a_malformed_max_size_is_a_usage_error(built_cache, tmp_path):
    p = run_cli("wheel", "--cache", str(built_cache), "--max-size", "ten MB", "-o", str(tmp_path), check=False)
    assert p.returncode == 2 and "--max-size" in p.stderr and "is not a size" in p.stderr


@pytest.mark.slow
def test_a_failure_publishing_a_later_wheel_removes_the_earlier_ones(built_cache, tmp_path, monkeypatch):
    """No incomplete set is left: the disk fills while the second wheel is copied into -o."""
    real_copy = shutil.copyfile
    copied = []

    def copyfile(src, dst, *a, **k):
        if str(src).endswith(".whl"):
            copied.append(src)
            if len(copied) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    out = tmp_path / "dist"
    with pytest.raises(ArchiveError, match="the disk is full"):
        build_wheels(Cache(built_cache), _selection(built_cache), out, name="x", host_arch=HOST, max_size=10**10)
    assert len(copied) == 2 and list(out.iterdir()) == []


@pytest.mark.slow
def test_split_wheels_are_each_signed(built_cache, split, tmp_path):
    pytest.importorskip("cryptography", reason="signatures need the cryptography package (the cli extra)")
    from fa4aot.core.signing import check_cache_files

    public = run_cli("keygen", str(tmp_path / "release.key")).stdout.strip()
    out = tmp_path / "dist"
    run_cli(
        "wheel",
        "--cache",
        str(built_cache),
        "--max-size",
        "10GB",
        "-o",
        str(out),
        "--sign",
        str(tmp_path / "release.key"),
    )
    wheels = _wheels(out)
    assert len(wheels) == len(_wheels(split))
    # the signing key is part of the content: a signed set is another version than the unsigned one
    assert not {w.name for w in wheels} & {w.name for w in _wheels(split)}
    for w in wheels:
        root = tmp_path / w.stem
        with zipfile.ZipFile(w) as z:
            z.extractall(root)
        dist = WHEEL_NAME.fullmatch(w.name)["dist"]
        assert check_cache_files(root / dist / "cache", [public], w.name) == public


@pytest.mark.slow
def test_installed_split_wheels_serve_each_gpu(split, tmp_path):
    py = _venv(tmp_path / "venv")
    _pip_install(py, *_wheels(split))
    script = RUNTIME.format(tests=str(ROOT / "tests"))
    for cc, sms, dist in (("[9, 0]", "132", "fa4aot_cache_h100"), ("[10, 0]", "148", "fa4aot_cache_b200")):
        out = subprocess.run([py, "-c", script, cc, sms], capture_output=True, text=True, env=_env(True), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert dist in got["root"] and got["loaded"] > 0, got
