"""fa4aot's own distributions (issue 26, part 1): pyproject lists every package and data file on
disk; `python -m build --no-isolation` makes an sdist and, from it, a wheel holding every
subpackage, data file and license file; the wheel installs into a fresh venv where `import
fa4aot` works; the license texts fa4aot ships match their sources."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

#: What never goes into a distribution: VCS data, environments, caches and build outputs.
NOT_SOURCE = (".git", ".venv", "venv", "cache", ".devcarry", ".device", ".whl", "build", "dist")
#: (*.so: the compiled hop an editable install builds in place; the wheel must build its own)
NOT_SOURCE_GLOBS = ("*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "*.pyc", "*.so")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_dirs() -> dict[str, Path]:
    """Every package on disk (a directory with an ``__init__.py``) under ``fa4aot/`` and under
    the directories ``package-dir`` maps, by dotted name - found by walking, not from pyproject's
    list, so a subpackage someone adds and forgets to list is caught."""
    setuptools = _pyproject()["tool"]["setuptools"]
    roots = {"fa4aot": ROOT / "fa4aot", **{name: ROOT / d for name, d in setuptools.get("package-dir", {}).items()}}
    found = {}
    for name, top in roots.items():
        for init in top.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(top).parts
            found[".".join((name, *rel))] = init.parent
    return found


def _data_files(pkg_dir: Path) -> list[str]:
    """Files of a package directory (not of its subpackages) that are not Python source (nor an
    extension module an editable install compiled in place: setup.py's)."""
    out = []
    for p in pkg_dir.rglob("*"):
        rel = p.relative_to(pkg_dir)
        if not p.is_file() or "__pycache__" in rel.parts or p.suffix in (".py", ".pyc", ".so"):
            continue
        # a file inside a subpackage is that subpackage's
        if any((pkg_dir.joinpath(*rel.parts[:i]) / "__init__.py").exists() for i in range(1, len(rel.parts))):
            continue
        out.append(rel.as_posix())
    return sorted(out)


def test_pyproject_lists_every_package_on_disk():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = set(_package_dirs())
    assert "fa4aot.plan" in on_disk and "fa4aot_kernels" in on_disk  # the walk finds packages at all
    assert on_disk - listed == set(), "packages on disk missing from [tool.setuptools] packages"
    assert listed - on_disk == set(), "[tool.setuptools] packages names packages that do not exist"


def test_every_data_file_of_a_package_is_package_data():
    globs = _pyproject()["tool"]["setuptools"].get("package-data", {})
    missing = [
        f"{name}: {rel}"
        for name, d in _package_dirs().items()
        for rel in _data_files(d)
        if not any(fnmatch.fnmatch(rel, g) for g in globs.get(name, []))
    ]
    assert missing == [], "files a wheel would leave out (add them to [tool.setuptools.package-data])"
    assert "shim.c" in _data_files(ROOT / "fa4aot" / "plan")  # the check sees data files at all


def test_license_files_are_bsd3_and_the_shipped_copies_match():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License\n") and "Copyright (c) the fa4aot authors." in text
    assert _pyproject()["project"]["license"] == "BSD-3-Clause"
    assert set(_pyproject()["project"]["license-files"]) == {"LICENSE", "NOTICE"}
    licenses = ROOT / "fa4aot" / "compile" / "licenses"
    # cache wheels carry these copies (package data); the root files are what people read
    assert (licenses / "fa4aot.txt").read_text() == text
    assert (licenses / "NOTICE").read_text() == (ROOT / "NOTICE").read_text()
    assert "NVIDIA Software License Agreement" in (ROOT / "NOTICE").read_text()


@pytest.mark.parametrize(
    ("dist", "copy", "names"),
    [
        ("flash-attn-4", "flash-attn-4.txt", ("LICENSE", "AUTHORS")),
        ("quack-kernels", "quack-kernels.txt", ("LICENSE",)),
    ],
)
def test_third_party_license_copies_match_the_pinned_packages(dist, copy, names):
    """The texts cache wheels carry are the installed (pinned) packages' own license files."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (the build extra)")
    pinned = [r for r in _pyproject()["project"]["optional-dependencies"]["build"] if r.startswith(f"{dist}==")]
    if pinned != [f"{dist}=={d.version}"]:
        pytest.skip(f"{dist} {d.version} is installed, not the pinned {pinned}")
    shipped = (ROOT / "fa4aot" / "compile" / "licenses" / copy).read_text()
    for name in names:
        source = d.read_text(f"licenses/{name}")
        assert source is not None, f"{dist} ships no licenses/{name}"
        assert source.strip() in shipped, f"{copy} differs from {dist}'s {name}"


def _source_copy(dst: Path) -> Path:
    """A copy of the checkout without VCS data, environments or build outputs: building writes
    egg-info and build directories into its source tree, and others work in this one."""
    ignore = shutil.ignore_patterns(*NOT_SOURCE_GLOBS)

    def skip(where: str, names: list[str]) -> set[str]:
        top = {n for n in names if n in NOT_SOURCE} if Path(where) == ROOT else set()
        return top | set(ignore(where, names))

    return Path(shutil.copytree(ROOT, dst, ignore=skip))


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """fa4aot's sdist and wheel, built as the README says: `python -m build --no-isolation` (the
    wheel is built from the sdist, so a file the sdist lacks is missing from the wheel too)."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("needs the 'build' package (pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp("fa4aot-dist")
    src = _source_copy(tmp / "src")
    out = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return sdists[0], wheels[0]


@pytest.mark.slow
def test_the_wheel_holds_every_package_data_and_license_file(dists):
    _, wheel = dists
    version = _pyproject()["project"]["version"]
    # the compiled hop (setup.py) makes it a wheel of this host arch, for every CPython >= 3.10
    assert wheel.name == f"fa4aot-{version}-cp310-abi3-linux_{platform.machine()}.whl"
    with zipfile.ZipFile(wheel) as z:
        members = set(z.namelist())
        metadata = z.read(f"fa4aot-{version}.dist-info/METADATA").decode()
    expected = set()
    for name, d in _package_dirs().items():
        base = name.replace(".", "/")
        expected |= {f"{base}/{p.relative_to(d).as_posix()}" for p in d.glob("*.py")}
        expected |= {f"{base}/{rel}" for rel in _data_files(d)}
    assert {"fa4aot/plan/shim.c", "fa4aot/plan/runner.c", "fa4aot_kernels/__init__.py"} <= expected
    assert expected - members == set(), "files on disk missing from the wheel"
    assert "fa4aot/plan/_hop.abi3.so" in members
    licenses = {f"fa4aot-{version}.dist-info/licenses/LICENSE", f"fa4aot-{version}.dist-info/licenses/NOTICE"}
    assert licenses <= members
    assert "License-Expression: BSD-3-Clause" in metadata and "License-File: NOTICE" in metadata


def test_the_sdist_holds_the_sources_and_licenses(dists):
    sdist, _ = dists
    version = _pyproject()["project"]["version"]
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    want = {"LICENSE", "NOTICE", "README.md", "pyproject.toml", "setup.py", "fa4aot/plan/shim.c", "fa4aot/plan/_hop.c"}
    want.add("kernels/__init__.py")
    want |= {f"fa4aot/compile/licenses/{p.name}" for p in (ROOT / "fa4aot" / "compile" / "licenses").iterdir()}
    assert want - members == set()
    assert not [m for m in members if m.endswith(".so")], "an sdist carries sources only"
    assert sdist.name == f"fa4aot-{version}.tar.gz"


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_imports(dists, tmp_path):
    _, wheel = dists
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # the test environment's pip installs into the venv: no network, no dependencies (cuda-python
    # is not needed to import fa4aot: its names resolve lazily)
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)]
    proc = subprocess.run(pip, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    code = (
        "import json, fa4aot, importlib.resources as r, importlib.util as u\n"
        "print(json.dumps({'file': fa4aot.__file__, 'version': fa4aot.__version__,\n"
        "  'shim': r.files('fa4aot.plan').joinpath('shim.c').is_file(),\n"
        "  'hop': u.find_spec('fa4aot.plan._hop') is not None,\n"
        "  'kernels': u.find_spec('fa4aot_kernels').origin,\n"
        "  'notice': r.files('fa4aot.compile').joinpath('licenses/NOTICE').is_file()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert Path(got["file"]).is_relative_to(venv) and Path(got["kernels"]).is_relative_to(venv), got
    assert got["version"] == _pyproject()["project"]["version"] and got["shim"] and got["notice"] and got["hop"]
    assert (venv / "bin" / "fa4aot").is_file()  # the console script
    # the CLI's own dependencies (click, ...) from this environment, fa4aot from the venv
    import click

    deps = str(Path(click.__file__).resolve().parent.parent)
    ver = subprocess.run(
        [venv / "bin" / "fa4aot", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(env, PYTHONPATH=deps),
    )
    assert ver.returncode == 0 and _pyproject()["project"]["version"] in ver.stdout, (ver.stdout, ver.stderr)
