"""The command line as a release ships it: --version and `python -m fa4aot`, --json everywhere a
command lists or checks (docs/cli-json.md), dry runs, progress, Ctrl-C, logging, the environment
variables' module (docs/environment.md), and the small bugs of issue 26 (each test says which)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_driver import FakeDriver
from helpers import FAST_MANIFEST, ROOT, combine_variant, needs_dsl, run_cli

from fa4aot.compile.store import CacheWriter, GcListing
from fa4aot.core import env
from fa4aot.core.errors import DeviceMismatchError
from fa4aot.core.index import Cache
from fa4aot.core.variant import Target, cache_key
from fa4aot.tools import cli
from fa4aot.tools.cli import main
from fa4aot.tools.progress import Progress


def _fake_cache(root: Path, targets: tuple[Target, ...] = (Target("b200", "sm_100a", 148),)) -> list[str]:
    """A cache of fake combine entries (one per target, distinct blobs); their keys."""
    cache = CacheWriter(root)
    keys = []
    for i, t in enumerate(targets, 1):
        v = combine_variant(i, t.arch, t.num_sms)
        key = cache_key(v, {"x": "1"}, "x86_64")
        meta = {"variant": v.to_dict(), "target": t.to_dict(), "toolchain": {"x": "1"}, "host_arch": "x86_64"}
        cache.put(key, meta, {"cubin": bytes([i]) * (1000 * i), "plan": bytes([i + 100]) * 50})
        keys.append(key)
    cache.close()
    return keys


def _invoke(*args: str, env_vars: dict[str, str] | None = None):
    """The CLI in this process (click's runner: stdout and stderr apart)."""
    return CliRunner().invoke(main, list(args), env=env_vars, catch_exceptions=False)


# -- --version, python -m fa4aot ---------------------------------------------------------------


def _pyproject_pin(dist: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{re.escape(dist)}(\[[^\]]*\])?==([^"]+)"', text)
    assert m, f"pyproject.toml's build extra pins no {dist}"
    return m.group(2)


def test_version_names_the_pins_and_python_m_imports_no_torch():
    code = textwrap.dedent(
        """
        import runpy, sys
        for argv in (["fa4aot", "--version"], ["fa4aot", "ls", "--help"]):
            sys.argv = argv
            try:
                runpy.run_module("fa4aot", run_name="__main__")
            except SystemExit as e:
                assert e.code in (0, None), e.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cutlass", "flash_attn", "triton"))
        print("HEAVY", heavy)
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stdout, p.stdout
    from fa4aot import __version__

    assert p.stdout.startswith(f"fa4aot {__version__}\n")
    for dist in ("flash-attn-4", "nvidia-cutlass-dsl"):
        assert f"{dist} {_pyproject_pin(dist)}" in p.stdout  # what the build extra pins
    assert "Usage: fa4aot ls" in p.stdout
    # the module runs as a script too, with the same exit statuses
    p = subprocess.run([sys.executable, "-m", "fa4aot", "ls", "--family", "nosuch"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown family" in p.stderr


# -- bugs: ls --family, from-misses, --host-arch, verify --against-fa4, reprs, columns -----------


def test_ls_of_an_unknown_family_is_a_usage_error_listing_the_known(tmp_path):
    """`ls --family nosuch` listed nothing and exited 0."""
    _fake_cache(tmp_path / "c")
    r = _invoke("ls", "--cache", str(tmp_path / "c"), "--family", "nosuch")
    assert r.exit_code == 2 and "unknown family 'nosuch'" in r.stderr
    assert "combine" in r.stderr and "fwd_sm100" in r.stderr
    r = _invoke("ls", "--cache", str(tmp_path / "c"), "--family", "combine")
    assert r.exit_code == 0 and r.stdout.count("combine[") == 1


def test_ls_columns_line_up_whatever_the_target_names(tmp_path):
    """A target name longer than 6 characters shifted the rest of its line."""
    targets = (Target("h100", "sm_90a", 132), Target("rtx-pro-6000", "sm_120a", 188), Target("b200", "sm_100a", 148))
    _fake_cache(tmp_path / "c", targets)
    r = _invoke("ls", "--cache", str(tmp_path / "c"))
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and len(lines) == 3
    for col in ("sm_", "x86_64", "B  combine"):  # label, host arch and size columns start at one place
        assert len({ln.index(col) for ln in lines}) == 1, r.stdout
    assert "3 entries" in r.stderr and str(tmp_path / "c") in r.stderr  # it names the cache it read


def test_table_pads_every_column_but_the_last():
    lines = cli._table([["a", "1", "x"], ["longer", "100", "y"]], right=(1,))
    assert lines == ["a         1  x", "longer  100  y"]


def test_manifest_from_an_empty_miss_log_is_refused_and_writes_nothing(tmp_path):
    """It wrote a manifest `fa4aot plan` then refused."""
    log = tmp_path / "misses.jsonl"
    for text in ("", "\n\n"):
        log.write_text(text)
        out = tmp_path / "m.yaml"
        r = _invoke("manifest", "from-misses", str(log), "-o", str(out))
        assert r.exit_code == 1 and "name no variant" in r.stderr and "not written" in r.stderr
        assert not out.exists()


@pytest.mark.parametrize(("given", "normalised"), [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("arm64", "aarch64")])
def test_host_arch_aliases_are_normalised(given, normalised):
    assert cli._host_arch_option(None, None, given) == normalised  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["pack", "push", "pull"])
def test_an_unknown_host_arch_is_a_usage_error_before_anything_is_read(tmp_path, command):
    """`--host-arch arm64` was taken as is, and a wrong one failed later, vaguely."""
    args = [command, "--cache", str(tmp_path / "none"), "--host-arch", "sparc"]
    args += ["-o", str(tmp_path / "a.fa4")] if command == "pack" else [str(tmp_path / "store")]
    r = _invoke(*args)
    assert r.exit_code == 2 and "unknown host arch 'sparc'" in r.stderr and "aarch64" in r.stderr
    assert not (tmp_path / "a.fa4").exists() and not (tmp_path / "store").exists()


def test_verify_against_fa4_without_the_build_extra_says_so_in_one_line(tmp_path):
    """It printed a traceback per entry. The extra is hidden by a sys.modules block."""
    _fake_cache(tmp_path / "c")
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "flash_attn", "cutlass"):
            sys.modules[name] = None  # as if not installed: importing it fails
        from fa4aot.tools.cli import main
        main(["verify", "--cache", {str(tmp_path / "c")!r}, "--no-plans", "--against-fa4"])
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "'.[build]'" in p.stderr and "Traceback" not in p.stderr


def test_human_text_replaces_python_reprs():
    assert cli._text(None) == "none"
    assert cli._text([256, 1, 1]) == "[256, 1, 1]" and cli._text((2, None)) == "(2, none)"
    assert cli._text({"cooperative": 0}) == "cooperative=0"
    assert cli._built_text({"seconds": 0.663, "peak_rss_mb": 687.0}) == "in 0.7 s, peak RSS 687 MiB"


@needs_dsl
def test_show_and_launch_plan_print_no_python_reprs(built_cache):
    """`cluster None`, `{'peak_rss_mb': ...}` and `attributes {...}` were printed as Python wrote them."""
    entries = Cache(built_cache).entries()
    e = next(e for e in entries if e.variant.family == "fwd_sm90" and e.host_arch == "x86_64")
    shown = run_cli("show", e.key[:12], "--cache", str(built_cache)).stdout
    plan = run_cli("launch-plan", e.key[:12], "--cache", str(built_cache), "--no-params").stdout
    for out in (shown, plan):
        assert not re.search(r"\bNone\b", out) and "{'" not in out and "peak_rss_mb" not in out, out
    assert "cluster none" in plan and re.search(r"built +in \d+\.\d s, peak RSS \d+ MiB from", shown)


# -- gc: the bytes it frees, --dry-run -------------------------------------------------------


def test_gc_frees_the_blobs_of_the_entries_it_drops_at_once(tmp_path):
    """gc dropped entries but kept their blobs while younger than --grace: `freed 0 B`."""
    keys = _fake_cache(tmp_path, (Target("h100", "sm_90a", 132), Target("b200", "sm_100a", 148)))
    cache = CacheWriter(tmp_path, create=False)
    doomed = cache.get(keys[1])
    size = sum(b.size for b in doomed.blobs.values())
    dry = GcListing()
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert cache.gc({keys[0]}, dry_run=True, listing=dry) == {
        "entries_removed": 1,
        "files_removed": 2,
        "bytes_freed": size,
    }
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before and cache.get(keys[1]) is not None
    real = GcListing()
    assert cache.gc({keys[0]}, listing=real) == {"entries_removed": 1, "files_removed": 2, "bytes_freed": size}
    assert sorted(real.files) == sorted(dry.files) and [e.key for e in real.entries] == [keys[1]]
    assert not any(cache.blob_path(b).exists() for b in doomed.blobs.values())
    assert cache.read_blob(cache.get(keys[0]), "cubin")  # the kept entry's blobs stay


@needs_dsl
def test_gc_manifest_dry_run_then_real_frees_what_it_says(built_cache, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(built_cache, root, copy_function=shutil.copy)  # fresh files: all inside --grace
    n = len(Cache(root).entries())
    m = tmp_path / "one.yaml"  # a manifest of one variant the cache lacks: every entry goes
    m.write_text("target: {name: h100, arch: sm_90a, num_sms: 132}\nfamilies:\n  combine:\n    - head_dim: [96]\n")
    files = {p: p.stat().st_size for p in (root / "blobs").rglob("*") if p.is_file()}
    gc = ["gc", "--cache", str(root), "--manifest", str(m), "--other-toolchains"]  # a kept cache has older ones'
    dry = run_cli(*gc, "--dry-run").stdout
    assert sum(ln.startswith("would remove entry") for ln in dry.splitlines()) == n
    assert {p: p.stat().st_size for p in (root / "blobs").rglob("*") if p.is_file()} == files  # nothing changed
    out = run_cli(*gc).stdout
    freed = re.search(r"removed (\d+) entries and (\d+) files, freed (.+?) \(cache", out)
    assert freed and int(freed.group(1)) == n and int(freed.group(2)) == len(files), out
    assert freed.group(3) == cli._human(sum(files.values())) and f"would free {freed.group(3)}" in dry
    assert not any(p.is_file() for p in (root / "blobs").rglob("*"))


# -- Ctrl-C ---------------------------------------------------------------------------------------


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(tmp_path, monkeypatch):
    _fake_cache(tmp_path / "c")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("fa4aot.tools.verify.verify", interrupted)
    r = _invoke("verify", "--cache", str(tmp_path / "c"))
    assert r.exit_code == cli.INTERRUPTED_EXIT and r.stderr == "fa4aot: interrupted\n" and r.stdout == ""


#: 32 combine kernels (about 10 s on 2 cores): the build is still running when the signal comes
SIGINT_MANIFEST = """\
target: {name: h100, arch: sm_90a, num_sms: 132}
families:
  combine:
    - dtype: [bf16, fp16]
      head_dim: [64, 96, 128, 192, 256]
      max_splits: [16, 32, 64, 128]
"""


@pytest.mark.slow
@needs_dsl
def test_sigint_to_a_build_ends_it_at_once_with_exit_130_and_no_traceback(tmp_path):
    """A build used to print 117 lines of tracebacks (its workers' too). SIGINT goes to the whole
    process group, as a terminal's Ctrl-C does, once a worker has stored an entry."""
    m = tmp_path / "m.yaml"
    m.write_text(SIGINT_MANIFEST)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "fa4aot", "build", str(m), "--cache", str(cache), "-j", "2", "-q"]
    # SIGINT as a terminal leaves it: a shell starts background jobs with SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler (a CI script started with `&` does that)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 300
    while not any((cache / "blobs").rglob("*.so")) if (cache / "blobs").is_dir() else True:
        assert p.poll() is None and time.monotonic() < deadline, "the build ended before a worker stored anything"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, out + err
    assert len(err.splitlines()) <= 3 and "fa4aot: interrupted" in err and "Traceback" not in err, err
    for _ in range(100):  # its workers are gone too (terminated, not left compiling)
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("build workers outlived the interrupted build")
    assert len(Cache(cache).entries()) < 10


# -- progress ---------------------------------------------------------------------------------


def test_progress_prints_plain_lines_with_counts_and_eta_off_a_terminal():
    buf = io.StringIO()
    with Progress(3, "build", stream=buf) as bar:
        for name in "abc":
            bar.step(f"built {name}")
    lines = buf.getvalue().splitlines()
    assert [ln.split(" (ETA")[0] for ln in lines] == ["[1/3] built a", "[2/3] built b", "[3/3] built c"]
    assert "(ETA " in lines[0] and "ETA" not in lines[2]
    buf = io.StringIO()
    advance = Progress(100, "pack", stream=buf, lines=False).callback()
    for i in range(1, 101):
        advance(i, 100)
    assert buf.getvalue() == "[100/100] pack\n"  # steps without lines of their own: throttled
    Progress(3, "x", stream=buf, enabled=False).step("y")  # quiet: nothing more
    assert buf.getvalue() == "[100/100] pack\n"


def test_progress_draws_a_bar_with_counts_on_a_terminal():
    pytest.importorskip("tqdm")
    buf = io.StringIO()
    with Progress(4, "push", stream=buf, bar=True) as bar:
        bar.step("first")
        time.sleep(0.2)  # past tqdm's minimum refresh interval
        bar.step()
    text = buf.getvalue()
    assert "push:" in text and "2/4" in text and "first" in text


# -- --json ---------------------------------------------------------------------------------------


def test_json_of_ls_names_the_cache_and_errors_are_json_too(tmp_path):
    keys = _fake_cache(tmp_path / "c", (Target("h100", "sm_90a", 132), Target("b200", "sm_100a", 148)))
    doc = json.loads(_invoke("ls", "--cache", str(tmp_path / "c"), "--json").stdout)
    assert doc["command"] == "ls" and doc["cache"] == str((tmp_path / "c").absolute())
    assert sorted(r["key"] for r in doc["records"]) == sorted(keys) and doc["summary"]["entries"] == 2
    r = _invoke("ls", "--cache", str(tmp_path / "nothing"), "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["error"]["type"] == "CacheError"
    r = _invoke("ls", "--cache", str(tmp_path / "c"), "--family", "nosuch", "--json")
    err = json.loads(r.stdout)
    assert r.exit_code == 2 and err == {
        "command": "ls",
        "error": {"type": "BadParameter", "message": err["error"]["message"]},
    }


@pytest.mark.slow
@needs_dsl
def test_json_of_the_checking_commands(built_cache, tmp_path):
    n = len(Cache(built_cache).entries())
    doc = json.loads(run_cli("verify", "--cache", str(built_cache), "--no-plans", "--json").stdout)
    assert doc["command"] == "verify" and doc["summary"]["entries"] == n and doc["summary"]["passed"]
    doc = json.loads(run_cli("build", str(FAST_MANIFEST), "--cache", str(built_cache), "-q", "--json").stdout)
    assert doc["summary"]["failed"] == 0 and doc["summary"]["cached"] == len(doc["records"]) > 0
    doc = json.loads(run_cli("plan", str(FAST_MANIFEST), "--against", str(built_cache), "--json").stdout)
    assert doc["summary"]["ok"] and all(r["present"] for r in doc["records"])
    _fake_cache(tmp_path / "other")
    p = run_cli("plan", str(FAST_MANIFEST), "--against", str(tmp_path / "other"), "--json", check=False)
    doc = json.loads(p.stdout)
    assert p.returncode == 1 and doc["summary"]["lacks"] == doc["summary"]["variants"] == len(doc["records"])


@needs_dsl
def test_push_dry_run_uploads_nothing_and_pull_json_says_what_it_did(built_cache, tmp_path):
    store, dst = tmp_path / "store", tmp_path / "dst"
    sel = ["--cache", str(built_cache), "--target", "h100"]
    dry = run_cli("push", str(store), *sel, "--dry-run").stdout
    assert "would upload" in dry and "entries/" in dry and not store.exists()
    run_cli("push", str(store), *sel)
    pulled = ["pull", "--insecure", str(store), "--cache", str(dst), "--json"]
    doc = json.loads(run_cli(*pulled, "--dry-run").stdout)
    assert doc["summary"]["dry_run"] and {r["action"] for r in doc["records"]} == {"pull"} and not dst.exists()
    doc = json.loads(run_cli(*pulled).stdout)
    assert doc["store"] == str(store) and doc["summary"]["pulled"] == len(doc["records"]) > 0
    assert {r["action"] for r in json.loads(run_cli(*pulled).stdout)["records"]} == {"present"}


@needs_dsl
def test_json_of_install_and_check_plans(built_cache, tmp_path):
    archive, dst = tmp_path / "h100.fa4", tmp_path / "dst"
    run_cli("pack", "--cache", str(built_cache), "--target", "h100", "-o", str(archive))
    install = ["install", "--insecure", str(archive), "--cache", str(dst), "--json"]
    doc = json.loads(run_cli(*install).stdout)
    n = doc["summary"]["verified"]
    assert doc["source"] and doc["summary"]["added"] == n == len(doc["records"]) > 0
    assert {r["action"] for r in json.loads(run_cli(*install).stdout)["records"]} == {"present"}
    doc = json.loads(run_cli("check-plans", "--cache", str(dst), "-n", "1", "--json").stdout)
    assert doc["cache"] == str(dst) and doc["summary"]["with_problems"] == 0
    assert doc["summary"]["variants"] == len(doc["records"]) > 0 and all(r["calls"] == 1 for r in doc["records"])


def test_show_config_lists_every_variable_with_its_value(monkeypatch):
    monkeypatch.setenv(env.ALLOW_SM_MISMATCH, "1")
    monkeypatch.setenv("CC_AARCH64", "my-cross-gcc")
    doc = json.loads(_invoke("show-config", "--json").stdout)
    values = {r["name"]: r["value"] for r in doc["records"]}
    assert values[env.ALLOW_SM_MISMATCH] == "1" and values["CC_AARCH64"] == "my-cross-gcc"
    assert set(values) >= {v.name for v in env.VARS if v.name != env.CC_ARCH}
    text = _invoke("show-config").stdout
    assert re.search(rf"{env.ALLOW_SM_MISMATCH} +'1'", text) and re.search(rf"{env.REQUIRE} +\(unset\)", text)


# -- logging -----------------------------------------------------------------------------------


def test_quiet_and_fa4aot_log_hide_the_cache_announcement(tmp_path):
    _fake_cache(tmp_path / "c")
    base = {"FA4AOT_CACHE": str(tmp_path / "c")}
    assert "using the cache" in _invoke("ls", env_vars=base).stderr
    assert "using the cache" not in _invoke("-q", "ls", env_vars=base).stderr
    assert "using the cache" not in _invoke("ls", env_vars={**base, env.LOG: "WARNING"}).stderr
    assert "using the cache" in _invoke("-v", "ls", env_vars={**base, env.LOG: "WARNING"}).stderr
    r = _invoke("ls", env_vars={**base, env.LOG: "chatty"})
    assert r.exit_code == 2 and "FA4AOT_LOG" in r.stderr and "DEBUG" in r.stderr


@needs_dsl
def test_runtime_honours_fa4aot_log_and_allow_sm_mismatch(built_cache, monkeypatch, caplog):
    from fa4aot.runtime.loader import Runtime

    monkeypatch.delenv(env.ALLOW_SM_MISMATCH, raising=False)
    with pytest.raises(DeviceMismatchError, match=env.ALLOW_SM_MISMATCH):
        Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=114))
    monkeypatch.setenv(env.ALLOW_SM_MISMATCH, "1")
    monkeypatch.setenv(env.LOG, "DEBUG")
    with pytest.warns(RuntimeWarning, match="built for 132 SMs"), caplog.at_level(logging.NOTSET):
        rt = Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=114))
    assert rt.target.num_sms == 132
    assert logging.getLogger("fa4aot").level == logging.DEBUG
    assert any(r.name == "fa4aot.runtime.loader" and "opened the cache" in r.getMessage() for r in caplog.records)
    with pytest.raises(DeviceMismatchError):  # the argument wins over the environment
        Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=114), allow_sm_mismatch=False)


# -- the environment's module --------------------------------------------------------------------

#: os.environ reads allowed outside fa4aot/core/env.py: the record hook's bootstrap (it runs
#: before fa4aot is importable) and the scripts fa4aot hands to child processes. A line that is a
#: string literal (a .pth line, a child's script) is code for another interpreter: allowed, but
#: the variables it reads must be in the table.
ENV_READ_ALLOWED = {
    ("fa4aot/tools/record_hook.py", 'marked = _same_path(os.environ.get(HOOK_ENV, ""), hook_dir)'),
    ("fa4aot/tools/record_hook.py", 'if marked and _same_path(os.environ.get(PREFIX_ENV, ""), sys.prefix):'),
    ("fa4aot/tools/record_hook.py", 'entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)'),
    ("fa4aot/tools/fa4_parity.py", 'install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))'),
}
ENV_READ = re.compile(
    r"os\.getenv|os\.environ\.get\(|os\.environ\[[^\]]+\](?!\s*=)|dict\(os\.environ|in os\.environ|os\.environ\.copy"
)


def test_only_the_env_module_reads_the_environment():
    found = set()
    for path in sorted((ROOT / "fa4aot").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "fa4aot/core/env.py":
            continue
        for line in path.read_text().splitlines():
            if not ENV_READ.search(line):
                continue
            if line.strip()[:1] in ("'", '"'):
                names = set(re.findall(r"environ\.get\(\\?[\"']([A-Z0-9_]+)", line))
                assert names <= {v.name for v in env.VARS}, f"{rel}: {names} not in fa4aot.core.env.VARS"
                continue
            found.add((rel, line.strip()))
    assert found <= ENV_READ_ALLOWED, sorted(found - ENV_READ_ALLOWED)
    with pytest.raises(KeyError, match="not in fa4aot.core.env.VARS"):
        env.get("FA4AOT_NO_SUCH_THING")


def test_names_spelled_outside_the_env_module_match_its_table():
    from fa4aot.compile import stores, toolchain
    from fa4aot.tools import record_hook

    names = {v.name for v in env.VARS}
    assert {record_hook.RECORD_ENV, record_hook.NO_COMPILE_ENV, record_hook.HOOK_ENV, record_hook.PREFIX_ENV} <= names
    deadline = next(v for v in env.VARS if v.name == env.STORE_DEADLINE)
    assert float(deadline.default) == stores.TOTAL_DEADLINE_S
    for dist, version in toolchain.PINNED.items():
        assert _pyproject_pin(dist) == version


def test_environment_doc_holds_the_generated_table():
    doc = (ROOT / "docs" / "environment.md").read_text()
    m = re.search(r"<!-- env-table:begin[^>]*-->\n(.*?)<!-- env-table:end -->", doc, re.S)
    assert m, "docs/environment.md lost its env-table markers"
    assert m.group(1) == env.markdown_table(), (
        "regenerate it: python -c 'from fa4aot.core import env; print(env.markdown_table())'"
    )


def test_env_accessors_read_as_the_code_did(monkeypatch):
    monkeypatch.delenv(env.TUNING, raising=False)
    assert env.tuning()
    monkeypatch.setenv(env.TUNING, "0")
    assert not env.tuning()
    monkeypatch.setenv(env.STORE_CROSS_ORIGIN, " 1 ")
    assert env.flag(env.STORE_CROSS_ORIGIN)
    monkeypatch.setenv("CC_AARCH64", "x-gcc")
    assert env.cc_for("aarch64") == "x-gcc"
    monkeypatch.setenv("FA_DISABLE_2CTA", "1")
    assert env.fa4_knobs()["FA_DISABLE_2CTA"] == "1"
    monkeypatch.setenv(env.LOG, "info")
    assert env.log_level() == logging.INFO
    monkeypatch.setenv(env.CACHE, "")
    assert env.get(env.CACHE, "cache") == ""  # set but empty, as os.environ.get gives it
